"""The tokenize stage's block path (the word cache or sentencepiece's list API, one join, one write per batch)
produces exactly the ids and bytes of encoding and writing one document at a time."""
from __future__ import annotations

import io

import numpy as np
import sentencepiece as spm

from data_pipeline.shards import IndexedShard, ShardWriter
from data_pipeline.tokenizer import encode_block

TEXTS = ["", "Hello world.", "The quick brown fox jumps over the lazy dog. " * 30, "ünïcödé ✓ 12345",
         "a\nb\n\nc", "x" * 5000]


def tiny_model() -> spm.SentencePieceProcessor:
    buf = io.BytesIO()
    lines = [f"line {i} of the quick brown fox and the lazy dog, number {i * 7}." for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def test_encode_block_equals_per_document_encoding():
    sp = tiny_model()
    tokens, lengths = encode_block(sp, TEXTS, 2, np.uint16, threads=1)
    expected = [sp.encode(t) + [2] for t in TEXTS]
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [i for e in expected for i in e]
    for kw in ({"threads": 2}, {"cache_words": 100}):  # threads and the word cache change nothing
        again, _ = encode_block(sp, TEXTS, 2, np.uint16, **kw)
        assert again.tobytes() == tokens.tobytes(), kw


def test_add_documents_writes_the_bytes_of_add_document(tmp_path):
    docs = [np.arange(n, dtype=np.int64) * 3 % 65000 for n in (0, 1, 7, 1000)]
    with ShardWriter(str(tmp_path / "one"), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    with ShardWriter(str(tmp_path / "block"), np.uint16) as w:
        w.add_documents(np.concatenate(docs[:2]), np.array([0, 1]))
        w.add_documents(np.concatenate(docs[2:]), np.array([7, 1000]))
    for ext in (".bin", ".idx", ".stats.json"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"block{ext}").read_bytes(), ext
    assert IndexedShard(str(tmp_path / "block")).doc(3).tolist() == docs[3].tolist()
