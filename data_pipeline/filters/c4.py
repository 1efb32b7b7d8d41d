"""C4 rules (Raffel et al. 2020, as in datatrove's C4QualityFilter): line rules rewrite the text, document
rules remove it. The curly-bracket rule is configurable (off by default: it removes all code)."""
from __future__ import annotations

import re

from . import TERMINAL_PUNCT

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_sentences(line: str) -> int:
    return max(1, len(_SENTENCE_END.findall(line)))


def c4_step(doc: dict, cfg) -> str | None:
    kept, sentences = [], 0
    for line in doc["text"].split("\n"):
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
        sentences += count_sentences(line)
        kept.append(line)
    if sentences < cfg.min_sentences:
        return "c4.too_few_sentences"
    doc["text"] = "\n".join(kept)
    return None
