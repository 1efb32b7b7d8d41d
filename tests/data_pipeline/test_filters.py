"""Each filter rule on hand-made documents, at the published thresholds: one side of the boundary is kept,
the other removed under the rule's own name."""
from __future__ import annotations

import dataclasses

from data_pipeline.filters.clean import clean_text
from data_pipeline.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, LangConfig, LengthConfig
from data_pipeline.filters.c4 import c4_step
from data_pipeline.filters.fineweb import fineweb_step
from data_pipeline.filters.gopher import dup_ngram_chars, gopher_quality_step, gopher_repetition_step, top_ngram_chars
from data_pipeline.filters.lang import lang_step
from data_pipeline.filters.length import length_step


def run(step, text, cfg):
    doc = {"id": "t", "text": text, "meta": {}}
    return step(doc, cfg), doc


def q(**kw):
    return dataclasses.replace(GopherQualityConfig(), **kw)


def test_clean_nfc_controls_whitespace():
    raw = "Cafe\u0301\x00 \t x\u200b\r\n\n\n\nnext\u00a0 line  \x07"
    assert clean_text(raw) == "Caf\u00e9 x\n\nnext line"
    assert clean_text("a\n\n\n\nb", max_blank_lines=2) == "a\n\n\nb"


def test_length_bounds():
    cfg = LengthConfig(min_chars=10, max_chars=20, min_words=2)
    assert run(length_step, "a" * 9, cfg)[0] == "length.min_chars"
    assert run(length_step, "aaaa bbbbb", cfg)[0] is None  # exactly 10
    assert run(length_step, "a" * 21, cfg)[0] == "length.max_chars"
    assert run(length_step, "a" * 15, cfg)[0] == "length.min_words"


def _words_doc(n, word="house", stop=True):
    ws = [word] * n
    if stop:
        ws[:2] = ["the", "and"]
    return " ".join(ws)


def test_gopher_word_count_bounds():
    assert run(gopher_quality_step, _words_doc(50), q())[0] is None
    assert run(gopher_quality_step, _words_doc(49), q())[0] == "gopher_quality.min_words"
    assert run(gopher_quality_step, _words_doc(101), q(max_words=100))[0] == "gopher_quality.max_words"


def test_gopher_mean_word_length():
    # 60 words: 2 stop words (3 letters each) + 58 of length L; mean = (6 + 58 L) / 60
    short = " ".join(["the", "and"] + ["ab"] * 58)  # mean 2.03 < 3
    assert run(gopher_quality_step, short, q())[0] == "gopher_quality.min_avg_word_length"
    exact3 = " ".join(["the", "and"] + ["abc"] * 58)  # mean exactly 3.0: kept
    assert run(gopher_quality_step, exact3, q())[0] is None
    long = " ".join(["the", "and"] + ["a" * 11] * 58)
    assert run(gopher_quality_step, long, q())[0] == "gopher_quality.max_avg_word_length"


def test_gopher_symbol_ratio():
    base = ["the", "and"] + ["house"] * 98  # 100 words
    assert run(gopher_quality_step, " ".join(base[:90] + ["#x"] * 10), q())[0] is None  # 10/100 = 0.10
    assert run(gopher_quality_step, " ".join(base[:89] + ["#x"] * 11), q())[0] == "gopher_quality.hash_ratio"
    assert run(gopher_quality_step, " ".join(base[:89] + ["x..."] * 11), q())[0] == "gopher_quality.ellipsis_ratio"


def test_gopher_bullets_ellipsis_lines_alpha_stopwords():
    lines = ["the and house house house"] + ["- house house house house"] * 9  # 9/10 bullets = 0.9: kept
    text = "\n".join(lines * 2)
    assert run(gopher_quality_step, text, q())[0] is None
    text = "\n".join(["- the and house house house"] * 20)
    assert run(gopher_quality_step, text, q())[0] == "gopher_quality.bullet_lines"
    lines = ["the and house house house house."] * 7 + ["house house house house house..."] * 3  # 0.3: kept
    assert run(gopher_quality_step, "\n".join(lines * 2), q(max_symbol_word_ratio=1))[0] is None
    lines = lines[:6] + ["house house house house house..."] * 4
    assert run(gopher_quality_step, "\n".join(lines * 2), q(max_symbol_word_ratio=1))[0] == "gopher_quality.ellipsis_lines"
    ws = ["the", "and"] + ["house"] * 78 + ["1234"] * 20  # 80% alphabetic: kept
    assert run(gopher_quality_step, " ".join(ws), q())[0] is None
    ws = ["the", "and"] + ["house"] * 77 + ["1234"] * 21
    assert run(gopher_quality_step, " ".join(ws), q())[0] == "gopher_quality.alpha_words"
    assert run(gopher_quality_step, _words_doc(60, stop=False), q())[0] == "gopher_quality.stop_words"


def rep(**kw):
    off = dict(dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1, top_n_grams={}, dup_n_grams={})
    return dataclasses.replace(GopherRepetitionConfig(), **{**off, **kw})


def test_gopher_duplicate_lines_and_paragraphs():
    uniq = [f"line number {i} is unique" for i in range(7)]
    text = "\n".join(uniq + [uniq[0]] * 3)  # 3 duplicates / 10 lines = 0.30: kept
    assert run(gopher_repetition_step, text, rep(dup_line_frac=0.3))[0] is None
    text = "\n".join(uniq[:6] + [uniq[0]] * 4)
    assert run(gopher_repetition_step, text, rep(dup_line_frac=0.3))[0] == "gopher_repetition.dup_line_frac"
    paras = "\n\n".join(uniq[:6] + [uniq[0]] * 4)
    assert run(gopher_repetition_step, paras, rep(dup_para_frac=0.3))[0] == "gopher_repetition.dup_para_frac"
    # characters: one 40-char line repeated once in a 200-char doc = 0.2 -> kept; longer repeat -> removed
    a, filler = "x" * 39, "y" * 119
    text = "\n".join([a, a, filler])  # len = 39+1+39+1+119 = 199; dup chars 39 / 199 < 0.2
    assert run(gopher_repetition_step, text, rep(dup_line_char_frac=0.2))[0] is None
    text = "\n".join([a + "zz", a + "zz", "y" * 100])
    assert run(gopher_repetition_step, text, rep(dup_line_char_frac=0.2))[0] == "gopher_repetition.dup_line_char_frac"


def test_gopher_ngram_rules():
    ws = "a b a b c d".split()
    assert top_ngram_chars(ws, 2) == 3 * 2  # "a b" twice
    assert dup_ngram_chars("a b c a b c a b c".split(), 3) == 6  # two repeats of "abc"
    text = " ".join(f"w{i}" for i in range(200)) + " the cat the cat the cat"
    assert run(gopher_repetition_step, text, rep(top_n_grams={2: 0.20}))[0] is None
    text = "the cat " * 40 + "end"
    assert run(gopher_repetition_step, text, rep(top_n_grams={2: 0.20}))[0] == "gopher_repetition.top_2_gram"
    text = "one two three four five " * 10
    assert run(gopher_repetition_step, text, rep(dup_n_grams={5: 0.15}))[0] == "gopher_repetition.dup_5_gram"


def test_c4_line_and_document_rules():
    good = "This line is a proper sentence."
    text = "\n".join([good, "no terminal punctuation here", "Two words.", "Enable javascript to see this page.",
                      "We use cookies. See our privacy policy.", "A citation[1] sits here.", good, good, good])
    verdict, doc = run(c4_step, text, C4Config())
    assert verdict is None
    assert doc["text"].split("\n") == [good, "A citation sits here.", good, good, good]
    assert run(c4_step, "\n".join([good] * 4), C4Config())[0] == "c4.too_few_sentences"
    assert run(c4_step, "\n".join([good] * 5 + ["Lorem ipsum dolor sit amet."]), C4Config())[0] == "c4.lorem_ipsum"
    code = "\n".join([good] * 5 + ["Use a dict like {a: 1} in code."])
    assert run(c4_step, code, C4Config())[0] == "c4.curly_bracket"  # the published rule, on by default
    assert run(c4_step, code, C4Config(curly_bracket=False))[0] is None
    assert run(c4_step, "\n".join([good] * 5 + ["word " + "x" * 1001 + "."]), C4Config())[1]["text"].count("\n") == 4


def test_fineweb_rules():
    cfg = FineWebConfig()
    long_ok = "This is a sufficiently long line that ends well."
    text = "\n".join([long_ok] + [f"no punctuation at the end of line {i} here" for i in range(7)])  # 1/8 >= 0.12
    assert run(fineweb_step, text, cfg)[0] is None
    text = "\n".join([long_ok] + [f"no punctuation at the end of line {i} here" for i in range(8)])  # 1/9 < 0.12
    assert run(fineweb_step, text, cfg)[0] == "fineweb.line_punct_ratio"
    text = "\n".join([f"short {i}." for i in range(3)] + [long_ok.replace(".", f" {i}.") for i in range(1)])
    assert run(fineweb_step, text, cfg)[0] == "fineweb.short_line_ratio"  # 3/4 > 0.67
    lines = [f"{long_ok} number {i} of many more words here." for i in range(100)]
    assert run(fineweb_step, "\n".join(lines + [lines[0]]), cfg)[0] is None  # ~0.0099 dup chars: kept
    assert run(fineweb_step, "\n".join(lines + [lines[0]] * 2), cfg)[0] == "fineweb.char_dup_ratio"
    items = "\n".join(f"Item {i} ok." for i in range(20))
    assert run(fineweb_step, items, FineWebConfig(short_line_thr=1, words="whitespace"))[0] \
        == "fineweb.new_line_ratio"  # 19 newlines / 60 whitespace words > 0.3
    assert run(fineweb_step, items, FineWebConfig(short_line_thr=1))[0] is None  # / 80 datatrove words (". ")


def test_lang_filter():
    en = "The quick brown fox jumps over the lazy dog and then runs into the forest to find some food."
    de = "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann in den Wald, um Futter zu suchen."
    assert run(lang_step, en, LangConfig())[0] is None
    verdict, doc = run(lang_step, de, LangConfig())
    assert verdict == "lang.other_language" and doc["meta"]["lang"] == "de"
    assert run(lang_step, de, LangConfig(languages=["en", "de"]))[0] is None
    assert run(lang_step, en, LangConfig(min_score=1.01))[0] == "lang.low_score"
