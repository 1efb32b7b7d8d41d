"""Length filter: character and word bounds."""
from __future__ import annotations

from . import words


def length_step(doc: dict, cfg) -> str | None:
    n = len(doc["text"])
    if n < cfg.min_chars:
        return "length.min_chars"
    if n > cfg.max_chars:
        return "length.max_chars"
    if cfg.min_words and len(words(doc["text"])) < cfg.min_words:
        return "length.min_words"
    return None
