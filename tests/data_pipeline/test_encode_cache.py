"""The word cache (data_pipeline/encode_cache.py) gives exactly sentencepiece's ids: on adversarial texts (runs of
spaces, leading/trailing spaces, the U+2581 character itself, byte fallback, digits), across cache resets, and
for every model it refuses it says why (the stage then encodes whole documents)."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline.encode_cache import CachedEncoder, not_cacheable
from data_pipeline.tokenizer import encode_block

LINES = [f"line {i}:  the quick brown fox   jumps over {i * 7} lazy dogs.\tok\n    indented code = {i}"
         for i in range(400)]
PIECES = ["a", "b", "the", " ", "  ", "   ", "\n", "\t", "1", "23", "é", "✓", "中文", "\u2581", ".", "fox",
          "x" * 40, "🙂", "\u00a0", "\r\n", "dogs", "\u2581\u2581", "quick"]
EDGES = ["", " ", "  ", "a", " a", "a ", " a ", "a  b", "\u2581", "a\u2581b", "a \u2581 b", "   \n", "ab  ", "✓ ✓ ✓"]


def train(**kw) -> spm.SentencePieceProcessor:
    """A model trained with the pipeline's options (tokenizer.py), any of them overridden."""
    opts = dict(model_type="bpe", vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=buf, **{**opts, **kw})
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return EDGES + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40))) for _ in range(n)] + LINES[:50]


def test_the_pipeline_model_is_cached_and_encodes_exactly_as_sentencepiece():
    sp = train()
    assert not_cacheable(sp) == ""
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert any(set(p) == {"\u2581"} and len(p) > 1 for p in pieces), "whitespace-only pieces could cross a cut"
    enc = CachedEncoder(sp, np.uint16, max_words=300)  # small: the cache starts over many times
    docs = texts(4000, seed=0)
    got = []
    for i in range(0, len(docs), 37):
        got += enc.encode(docs[i:i + 37])
    assert [np.frombuffer(g, np.uint16).tolist() for g in got] == [sp.encode(t) for t in docs]
    assert enc.stats["new_words"] < enc.stats["words"]  # words were reused
    assert len(enc.words) <= 300 + 37 * 40


def test_int32_ids_and_a_second_pass_from_the_cache():
    sp = train()
    enc = CachedEncoder(sp, np.int32, max_words=10 ** 6)
    docs = texts(500, seed=1)
    first = enc.encode(docs)
    learned = enc.stats["new_words"]
    assert enc.encode(docs) == first and enc.stats["new_words"] == learned  # nothing new the second time
    assert [np.frombuffer(g, np.int32).tolist() for g in first] == [sp.encode(t) for t in docs]


UNIGRAM = {"model_type": "unigram", "vocab_size": 320, "hard_vocab_limit": False}


@pytest.mark.parametrize("kw, why", [(UNIGRAM, "not a BPE model"),
                                     ({"byte_fallback": False, "vocab_size": 120}, "no byte fallback"),
                                     ({"normalization_rule_name": "nmt_nfkc"}, "normalization rule 'nmt_nfkc'"),
                                     ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
                                     ({"add_dummy_prefix": False}, "no dummy prefix or unescaped spaces"),
                                     ({"split_by_whitespace": False}, "pieces span a word start")])
def test_models_the_cache_cannot_take_apart_are_encoded_whole(kw, why):
    sp = train(**kw)
    assert not_cacheable(sp) == why
    docs = texts(200, seed=2)
    tokens, lengths = encode_block(sp, docs, 2, np.int32, cache_words=1000)
    expected = [sp.encode(t) + [2] for t in docs]
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == [i for e in expected for i in e]
