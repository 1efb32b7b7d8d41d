"""The published rules, exactly: hand-made documents for each rule fixed against its reference, and the
``words: datatrove`` mode against keep/drop decisions recorded from datatrove 0.10.1 itself on the bundled corpus
(tests/data_pipeline/data/record_datatrove_decisions.py made datatrove_decisions.json)."""
from __future__ import annotations

import json
import os

import pytest

from data_pipeline.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from data_pipeline.filters.c4 import c4_step
from data_pipeline.filters.fineweb import fineweb_step
from data_pipeline.filters.gopher import gopher_quality_step, gopher_repetition_step
from data_pipeline.filters.word_split import datatrove_sentence_count, datatrove_words

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = os.path.join(HERE, "data", "datatrove_decisions.json")
STEPS = {"gopher_quality": (gopher_quality_step, GopherQualityConfig), "gopher_repetition":
         (gopher_repetition_step, GopherRepetitionConfig), "fineweb": (fineweb_step, FineWebConfig),
         "c4": (c4_step, C4Config)}


def verdict(step, text, cfg):
    return step({"id": "t", "text": text, "meta": {}}, cfg)


def test_gopher_stop_words_are_counted_distinct():
    filler = " ".join(["houses"] * 400)  # keeps the mean word length >= 3 beside 400 x "to"
    for words in ("whitespace", "datatrove"):
        cfg = GopherQualityConfig(words=words)
        assert verdict(gopher_quality_step, filler + " to" * 400, cfg) == "gopher_quality.stop_words"
        assert verdict(gopher_quality_step, filler + " to" * 399 + " of", cfg) is None
    # whitespace mode matches case-insensitively; datatrove's rule matches exactly
    assert verdict(gopher_quality_step, filler + " The To", GopherQualityConfig()) is None
    assert verdict(gopher_quality_step, filler + " The To", GopherQualityConfig(words="datatrove")) \
        == "gopher_quality.stop_words"


def test_fineweb_quote_is_not_terminal_punctuation():
    long_line = "a line that is long enough not to count as a short line"
    quoted = "\n".join([f'{long_line} "quoted"'] * 2 + [f"{long_line} {i} more" for i in range(8)])
    assert verdict(fineweb_step, quoted, FineWebConfig(char_dup_ratio=1)) == "fineweb.line_punct_ratio"  # 0/10
    dotted = quoted.replace('"quoted"', '"quoted".')
    assert verdict(fineweb_step, dotted, FineWebConfig(char_dup_ratio=1)) is None  # 2/10 >= 0.12
    # any Unicode sentence terminal counts, as in datatrove: the ideographic full stop
    assert verdict(fineweb_step, quoted.replace('"quoted"', "終わり。"), FineWebConfig(char_dup_ratio=1)) is None


def test_fineweb_new_line_ratio_counts_datatrove_words():
    # 10 lines "alpha<i>, beta": 9 newlines over 20 whitespace words (0.45 > 0.3: removed) but over 30 datatrove
    # words, the comma being one (0.30: kept), as datatrove decides
    text = "\n".join(f"alpha{i}, beta" for i in range(10))
    assert len(datatrove_words(text)) == 30
    cfg = dict(line_punct_thr=0, short_line_thr=1)
    assert verdict(fineweb_step, text, FineWebConfig(words="whitespace", **cfg)) == "fineweb.new_line_ratio"
    assert verdict(fineweb_step, text, FineWebConfig(**cfg)) is None  # words: datatrove is FineWeb's default
    assert verdict(fineweb_step, text.replace(", ", " "), FineWebConfig(**cfg)) == "fineweb.new_line_ratio"


def test_c4_curly_bracket_drops_the_page_by_default():
    good = "This line is a proper sentence."
    code = "\n".join([good] * 5 + ["Use a dict like {a: 1} in code."])
    assert verdict(c4_step, code, C4Config()) == "c4.curly_bracket"
    assert verdict(c4_step, code, C4Config(curly_bracket=False)) is None


def test_datatrove_word_split_facts():
    assert datatrove_words("Don't stop (e.g. here): see https://x.org/a. It's 10km, U.S.A.") == [
        "Do", "n't", "stop", "(", "e.g.", "here", "):", "see", "https://x.org/a", ".", "It", "'s", "10", "km", ",",
        "U.S.A."]
    assert datatrove_words("pathlib.Path well-known a,b x=y ...and") == [
        "pathlib", ".", "Path", "well", "-", "known", "a", ",", "b", "x", "=", "y", "...", "and"]
    assert datatrove_sentence_count("One. Two! Three? (four).") == 4
    assert datatrove_sentence_count("No end") == 1


def _corpus_texts() -> dict:
    from tests.data_pipeline.data.record_datatrove_decisions import corpus_docs, text_hash
    return {d["id"]: (d["text"], text_hash(d["text"])) for d in corpus_docs()}


@pytest.mark.slow
def test_datatrove_mode_agrees_with_recorded_datatrove_decisions():
    with open(RECORDED, encoding="utf-8") as f:
        rec = json.load(f)
    cols = rec["columns"]
    texts = _corpus_texts()
    rows = rec["docs"]
    assert sorted(texts) == sorted(r[0] for r in rows), "corpus changed: rerun record_datatrove_decisions.py"
    assert all(texts[r[0]][1] == r[1] for r in rows), "corpus text changed: rerun record_datatrove_decisions.py"
    report = {}
    for name, (step, cfg_cls) in STEPS.items():
        k, cfg = cols.index(name), cfg_cls(words="datatrove")  # every other key at its default = datatrove's
        same = sum((verdict(step, texts[r[0]][0], cfg) is None) == (r[k] == "keep") for r in rows)
        report[name] = same / len(rows)
    print({n: round(v, 4) for n, v in report.items()})
    assert all(v >= 0.99 for v in report.values()), report
    # (whitespace words agree far less on this markup-heavy corpus: Gopher quality 29%, repetition 70%)
