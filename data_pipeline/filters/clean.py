"""Cleaning: Unicode normalisation, control characters, whitespace. Changes text; never removes a document
(an emptied document is dropped downstream by the length filter and counted there)."""
from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except \t and \n, plus zero-width and BOM characters that only confuse tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace except newline (tabs, NBSP, ideographic space...)


def clean_text(text: str, normalization: str = "NFC", max_blank_lines: int = 1) -> str:
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    out, blanks = [], 0
    for line in lines:
        blanks = blanks + 1 if not line else 0
        if blanks <= max_blank_lines:
            out.append(line)
    return "\n".join(out).strip()


def clean_step(doc: dict, cfg) -> str | None:
    doc["text"] = clean_text(doc["text"], cfg.normalization, cfg.max_blank_lines)
    return None
