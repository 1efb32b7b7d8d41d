"""FineWeb quality rules (Penedo et al. 2024, "The FineWeb Datasets"), as datatrove 0.10.1's FineWebQualityFilter,
FineWeb's reference implementation, with its defaults:

- lines (non-blank, split on ``\\n``) ending in a sentence terminal >= 0.12 of lines; the terminals are datatrove's
  TERMINAL_PUNCTUATION (Unicode sentence terminals such as ``. ! ?``, no quote marks);
- lines of <= 30 characters <= 0.67 of lines;
- characters in duplicated lines <= 0.01 of the text's characters (newlines excluded);
- newlines per word <= 0.3, counted over datatrove's words (``words: datatrove``, the default: punctuation
  counts as words, see word_split.py); ``words: whitespace`` counts whitespace words instead (faster, and a
  deliberate difference: it removes more list-like pages).
"""
from __future__ import annotations

from . import find_duplicates
from .word_split import SENTENCE_TERMINALS, splitter


def fineweb_step(doc: dict, cfg) -> str | None:
    text = doc["text"]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return "fineweb.empty"
    if sum(ln[-1] in SENTENCE_TERMINALS for ln in lines) / len(lines) < cfg.line_punct_thr:
        return "fineweb.line_punct_ratio"
    if sum(len(ln) <= cfg.short_line_length for ln in lines) / len(lines) > cfg.short_line_thr:
        return "fineweb.short_line_ratio"
    if find_duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > cfg.char_dup_ratio:
        return "fineweb.char_dup_ratio"
    newlines = text.count("\n")
    # datatrove's words split whitespace words further, never fewer: below the threshold with whitespace words,
    # a document is below it with datatrove's too, and most documents are decided without splitting them
    if newlines / max(1, len(text.split())) > cfg.new_line_ratio:
        if newlines / max(1, len(splitter(cfg.words)(text))) > cfg.new_line_ratio:
            return "fineweb.new_line_ratio"
    return None
