"""FineWeb quality rules (datatrove FineWebQualityFilter defaults)."""
from __future__ import annotations

from . import TERMINAL_PUNCT, find_duplicates, words


def fineweb_step(doc: dict, cfg) -> str | None:
    text = doc["text"]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return "fineweb.empty"
    if sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / len(lines) < cfg.line_punct_thr:
        return "fineweb.line_punct_ratio"
    if sum(len(ln) <= cfg.short_line_length for ln in lines) / len(lines) > cfg.short_line_thr:
        return "fineweb.short_line_ratio"
    if find_duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > cfg.char_dup_ratio:
        return "fineweb.char_dup_ratio"
    if text.count("\n") / max(1, len(words(text))) > cfg.new_line_ratio:
        return "fineweb.new_line_ratio"
    return None
