"""Gopher quality and repetition rules (Rae et al. 2021), following datatrove's implementation and defaults.
Words are whitespace-separated tokens; fractions of characters are relative to ``len(text)``."""
from __future__ import annotations

import re
from collections import Counter

from . import PUNCTUATION, find_duplicates, words

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def top_ngram_chars(ws: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram times its count (datatrove's find_top_duplicate)."""
    grams = Counter(" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def dup_ngram_chars(ws: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram; a repeat jumps n words so overlaps count once."""
    seen, chars, i = set(), 0, 0
    while i < len(ws) - n + 1:
        gram = "".join(ws[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition_step(doc: dict, cfg) -> str | None:
    text = doc["text"]
    if not text:
        return "gopher_repetition.empty"
    paragraphs = _PARAGRAPHS.split(text.strip())
    n_dup, dup_chars = find_duplicates(paragraphs)
    if n_dup / len(paragraphs) > cfg.dup_para_frac:
        return "gopher_repetition.dup_para_frac"
    if dup_chars / len(text) > cfg.dup_para_char_frac:
        return "gopher_repetition.dup_para_char_frac"
    lines = _LINES.split(text)
    n_dup, dup_chars = find_duplicates(lines)
    if n_dup / len(lines) > cfg.dup_line_frac:
        return "gopher_repetition.dup_line_frac"
    if dup_chars / len(text) > cfg.dup_line_char_frac:
        return "gopher_repetition.dup_line_char_frac"
    ws = words(text)
    for n, frac in sorted((int(k), float(v)) for k, v in cfg.top_n_grams.items()):
        if top_ngram_chars(ws, n) / len(text) > frac:
            return f"gopher_repetition.top_{n}_gram"
    for n, frac in sorted((int(k), float(v)) for k, v in cfg.dup_n_grams.items()):
        if dup_ngram_chars(ws, n) / len(text) > frac:
            return f"gopher_repetition.dup_{n}_gram"
    return None


def gopher_quality_step(doc: dict, cfg) -> str | None:
    text = doc["text"]
    ws = words(text)
    content = [w for w in ws if any(ch not in PUNCTUATION for ch in w)]  # non-symbol words
    if len(content) < cfg.min_words:
        return "gopher_quality.min_words"
    if len(content) > cfg.max_words:
        return "gopher_quality.max_words"
    mean_len = sum(len(w) for w in content) / len(content)
    if mean_len < cfg.min_avg_word_length:
        return "gopher_quality.min_avg_word_length"
    if mean_len > cfg.max_avg_word_length:
        return "gopher_quality.max_avg_word_length"
    if text.count("#") / len(ws) > cfg.max_symbol_word_ratio:
        return "gopher_quality.hash_ratio"
    if (text.count("...") + text.count("…")) / len(ws) > cfg.max_symbol_word_ratio:
        return "gopher_quality.ellipsis_ratio"
    lines = text.splitlines() or [""]
    if sum(ln.lstrip().startswith(("•", "-", "*", "‣", "◦")) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "gopher_quality.bullet_lines"
    if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "gopher_quality.ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in ws) / len(ws) < cfg.min_alpha_words_ratio:
        return "gopher_quality.alpha_words"
    if sum(w.lower() in STOP_WORDS for w in ws) < cfg.min_stop_words:
        return "gopher_quality.stop_words"
    return None
