"""Per-document steps. Each ``<name>_step(doc, cfg)`` may rewrite ``doc["text"]`` and returns None to keep the
document or the name of the rule that removed it (counted in stats.json under that name). A step with a ``counts``
attribute (names) is called ``<name>_step(doc, cfg, counts)`` with a Counter of those names, shown in its stats row
(pii: redacted emails and IPs; decontaminate in redact mode: redacted documents, spans and words)."""
from __future__ import annotations

import re

TERMINAL_PUNCT = (".", "?", "!", '"', "'")
PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—‘’“”«»")
_WORD = re.compile(r"\S+")


def words(text: str) -> list[str]:
    """Whitespace words (Gopher's definition)."""
    return _WORD.findall(text)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in repeated items), first occurrences not counted."""
    seen, dup_n, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup_n += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup_n, dup_chars


def get_step(name: str):
    from .clean import clean_step
    from .c4 import c4_step
    from .decontaminate import decontaminate_step
    from .fineweb import fineweb_step
    from .gopher import gopher_quality_step, gopher_repetition_step
    from .lang import lang_step
    from .length import length_step
    from .pii import pii_step
    from .quality_classifier import quality_classifier_step
    from .url_filter import url_filter_step
    return {"clean": clean_step, "url_filter": url_filter_step, "pii": pii_step, "length": length_step, "lang": lang_step, "c4": c4_step,
            "gopher_quality": gopher_quality_step, "gopher_repetition": gopher_repetition_step,
            "fineweb": fineweb_step, "decontaminate": decontaminate_step,
            "quality_classifier": quality_classifier_step}[name]
