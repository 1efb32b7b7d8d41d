"""Gopher quality and repetition rules: Rae et al. 2021 ("Scaling Language Models", appendix A, table A1), with
the thresholds and rule order of datatrove 0.10.1's GopherQualityFilter / GopherRepetitionFilter.

Published rules implemented (quality): 50-100,000 words; mean word length 3-10; '#' and ellipsis to word ratio
<= 0.1; <= 90% of lines starting with a bullet; <= 30% ending with an ellipsis; >= 80% of words with an
alphabetic character; >= 2 *distinct* stop words of {the, be, to, of, and, that, have, with}. Word counts and
the mean length cover words with at least one non-punctuation character (as datatrove).
(repetition): duplicate lines / paragraphs by count and by characters; top 2-4-gram and duplicated 5-10-gram
character fractions, relative to ``len(text)``.

Deliberate differences, all behind ``words``: with ``words: whitespace`` (the default) a word is a run of
non-space characters, as in the Gopher paper, and stop words match case-insensitively ("The" counts); with
``words: datatrove`` words are the tokens datatrove counts (punctuation split off, see word_split.py) and stop
words match exactly, as datatrove does. In whitespace mode bullet lines may also start with ``* ‣ ◦`` (datatrove:
only ``•`` and ``-``), and symbol-only words are judged against ASCII plus common typographic punctuation
(datatrove: its own wider set, used in datatrove mode)."""
from __future__ import annotations

import itertools
import operator
import re

import numpy as np

from . import PUNCTUATION, find_duplicates
from .word_split import DATATROVE_PUNCTUATION, splitter

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_MULT = np.uint64(0x9E3779B97F4A7C15)
BULLETS = ("•", "-", "*", "‣", "◦")
DATATROVE_BULLETS = ("•", "-")
_STRIP = operator.methodcaller("strip", "".join(sorted(PUNCTUATION)))
_STRIP_DATATROVE = operator.methodcaller("strip", "".join(sorted(DATATROVE_PUNCTUATION)))
_HAS_ALPHA_BMP = None


def count_alpha_words(ws: list[str]) -> int:
    """Words with at least one alphabetic character (str.isalpha), counted with one C-level regex pass: a
    class of every alphabetic BMP character; words with characters beyond the BMP are checked one by one."""
    global _HAS_ALPHA_BMP
    if _HAS_ALPHA_BMP is None:
        letters = [chr(c) for c in range(0x10000) if chr(c).isalpha()]
        _HAS_ALPHA_BMP = re.compile("[" + "".join(map(re.escape, letters)) + "]")
    found = list(map(_HAS_ALPHA_BMP.search, ws))
    misses = itertools.compress(ws, map(operator.not_, found))
    wide = [w for w in misses if not w.isascii()]  # may hold a letter beyond the BMP
    return len(found) - found.count(None) + sum(any(map(str.isalpha, w)) for w in wide)


def _ngram_hashes(word_ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash per word n-gram (wrapping uint64 arithmetic; collisions are negligible)."""
    count = len(word_ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * _MULT + word_ids[k:k + count] + np.uint64(1)
    return h


class NgramIndex:
    """Words of one document with vectorised n-gram statistics (the pure-Python scan was the slowest step)."""

    def __init__(self, ws: list[str]):
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in ws), dtype=np.uint64, count=len(ws))
        self.cum = np.concatenate([[0], np.cumsum([len(w) for w in ws], dtype=np.int64)])

    def chars(self, i: int, n: int) -> int:
        return int(self.cum[i + n] - self.cum[i])

    def top_chars(self, n: int) -> int:
        """Characters of the most frequent n-gram (joined by spaces) times its count; ties go to the earliest
        n-gram, as Counter.most_common does (datatrove's find_top_duplicate)."""
        h = _ngram_hashes(self.ids, n)
        if not len(h):
            return 0
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        best = counts.max()
        i = int(first[counts == best].min())
        return (self.chars(i, n) + n - 1) * int(best)

    def dup_chars(self, n: int) -> int:
        """Characters (spaces excluded) in n-grams repeating an earlier n-gram; after a repeat the scan jumps n
        words, so overlapping repeats count once (datatrove's find_all_duplicate). Only positions whose n-gram
        occurred before are visited in Python; runs of first occurrences are marked in one numpy step."""
        h = _ngram_hashes(self.ids, n)
        if not len(h):
            return 0
        _, first, inv = np.unique(h, return_index=True, return_inverse=True)
        inv = inv.ravel()
        cands = np.flatnonzero(first[inv] != np.arange(len(h))).tolist()
        if not cands:
            return 0
        seen = np.zeros(len(first), dtype=bool)
        total, i, ci = 0, 0, 0
        while ci < len(cands):
            c = cands[ci]
            if c < i:  # skipped by a jump
                ci += 1
                continue
            if c > i:
                seen[inv[i:c]] = True
            g = inv[c]
            if seen[g]:
                total += self.chars(c, n)
                i = c + n
            else:
                seen[g] = True
                i = c + 1
            ci += 1
        return total


def top_ngram_chars(ws: list[str], n: int) -> int:
    return NgramIndex(ws).top_chars(n)


def dup_ngram_chars(ws: list[str], n: int) -> int:
    return NgramIndex(ws).dup_chars(n)


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
    index = NgramIndex(splitter(cfg.words)(text))
    for n, frac in sorted((int(k), float(v)) for k, v in cfg.top_n_grams.items()):
        if index.top_chars(n) / len(text) > frac:
            return f"gopher_repetition.top_{n}_gram"
    for n, frac in sorted((int(k), float(v)) for k, v in cfg.dup_n_grams.items()):
        chars = index.dup_chars(n)
        if chars / len(text) > frac:
            return f"gopher_repetition.dup_{n}_gram"
        if chars == 0:
            break  # no repeated n-gram means no repeated longer one either
    return None


def gopher_quality_step(doc: dict, cfg) -> str | None:
    text = doc["text"]
    datatrove = cfg.words == "datatrove"
    ws = splitter(cfg.words)(text)
    # non-symbol words: something is left after stripping symbols (strip runs in C; a generator per word did not)
    content = list(itertools.compress(ws, map(_STRIP_DATATROVE if datatrove else _STRIP, ws)))
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
    bullets = DATATROVE_BULLETS if datatrove else BULLETS
    if sum(ln.lstrip().startswith(bullets) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "gopher_quality.bullet_lines"
    if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "gopher_quality.ellipsis_lines"
    if count_alpha_words(ws) / len(ws) < cfg.min_alpha_words_ratio:
        return "gopher_quality.alpha_words"
    present = set(ws) if datatrove else {w.lower() for w in ws}
    if len(STOP_WORDS & present) < cfg.min_stop_words:  # distinct stop words: "to" 400 times is one
        return "gopher_quality.stop_words"
    return None
