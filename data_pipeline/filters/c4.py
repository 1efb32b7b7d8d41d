"""C4 rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2, and TensorFlow
Datasets' c4_utils), in the order and with the defaults of datatrove 0.10.1's C4QualityFilter. Line rules
rewrite the text, document rules remove it.

Published rules implemented: keep only lines ending in terminal punctuation (. ? ! " ', not an ellipsis); drop
lines with fewer than 3 words, mentioning "javascript", cookie / privacy / terms-of-use phrases, or holding a word
over 1000 characters; strip Wikipedia citation marks; drop the page if it contains "lorem ipsum" or a curly
bracket ``{`` (on by default, as published: it also removes most pages with code; ``c4.curly_bracket: false``
relaxes it) or has fewer than 5 sentences after line filtering. Not implemented: the bad-words list (a download).

Deliberate difference, behind ``words``: ``whitespace`` (the default) counts sentences as runs of . ? ! followed
by a space or the line end; ``datatrove`` counts them as datatrove does, with spaCy's sentencizer rule
(word_split.datatrove_sentence_count)."""
from __future__ import annotations

import re

from . import TERMINAL_PUNCT
from .word_split import datatrove_sentence_count

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_sentences(line: str) -> int:
    return max(1, len(_SENTENCE_END.findall(line)))


def c4_step(doc: dict, cfg) -> str | None:
    kept, sentences = [], 0
    count = datatrove_sentence_count if cfg.words == "datatrove" else count_sentences
    for line in doc["text"].splitlines():
        line = line.strip()
        if not line:
            continue
        ws = line.split()
        if cfg.max_word_length > 0 and any(len(w) > cfg.max_word_length for w in ws):
            continue
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        if cfg.terminal_punct and (not line.endswith(TERMINAL_PUNCT) or line.endswith("...")):
            continue
        if len(ws) < cfg.min_words_per_line:
            continue
        low = line.lower()
        if cfg.lorem_ipsum and "lorem ipsum" in low:
            return "c4.lorem_ipsum"
        if cfg.javascript and "javascript" in low:
            continue
        if cfg.curly_bracket and "{" in line:
            return "c4.curly_bracket"
        if cfg.policy and any(p in low for p in POLICY):
            continue
        sentences += count(line)
        kept.append(line)
    if sentences < cfg.min_sentences:
        return "c4.too_few_sentences"
    doc["text"] = "\n".join(kept)
    return None
