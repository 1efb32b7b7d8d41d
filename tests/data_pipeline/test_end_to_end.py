"""One pipeline run (2 workers) on a synthetic corpus with planted duplicates: shard format, exact tokens,
split, dedup outcome and stats bookkeeping."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from tests.data_pipeline.conftest import kept_ids

from data_pipeline.atomic_io import read_jsonl
from data_pipeline.tokenizer import is_valid


def _texts(out):
    texts = {}
    work = os.path.join(out, "work", "prepared")
    for n in sorted(os.listdir(work)):
        for doc in read_jsonl(os.path.join(work, n)):
            texts[doc["id"]] = doc["text"]
    return texts


def test_outputs_exist(pipeline_run):
    out, _, _ = pipeline_run
    for rel in ("shards/train-00000.bin", "shards/train-00000.idx", "shards/valid-00000.bin",
                "shards/valid-00000.idx", "tokenizer.model", "stats.json", "config.yaml"):
        assert os.path.isfile(os.path.join(out, rel)), rel


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_megatron_indexed_dataset_reads_exact_tokens(pipeline_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    out, _, _ = pipeline_run
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    texts = _texts(out)
    for split in ("train", "valid"):
        ids = open(os.path.join(out, "doc_ids", f"{split}-00000.txt")).read().splitlines()
        ds = IndexedDataset(os.path.join(out, "shards", f"{split}-00000"))  # kept alive while arrays are used
        assert len(ds) == len(ids) > 0
        assert ds.index.dtype == np.uint16
        for i, doc_id in enumerate(ids):
            assert ds[i].tolist() == sp.encode(texts[doc_id]) + [2], doc_id
            assert is_valid(doc_id, _cfg(out)) == (split == "valid")
        del ds


def _cfg(out):
    from data_pipeline import config
    return config.load(os.path.join(out, "config.yaml"))


def test_planted_duplicates_removed_and_originals_kept(pipeline_run):
    out, _, planted = pipeline_run
    ids = set(kept_ids(out))
    assert planted["exact"] not in ids
    assert not ids & set(planted["near"])
    assert set(planted["originals"]) <= ids  # survivor = smallest id of each cluster
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["dedup"]["exact"]["removed"] == 1
    assert stats["dedup"]["minhash"]["removed"] == 2
    assert stats["dedup"]["minhash"]["largest_cluster"] == 3
    assert stats["dedup"]["minhash"]["precision_estimate"] == 1.0


def test_stats_add_up(pipeline_run):
    out, _, _ = pipeline_run
    s = json.load(open(os.path.join(out, "stats.json")))
    assert s["input"]["docs"] == 4 * 30 + 3
    prev = s["input"]["docs_read"]
    for step in s["steps"]:  # each step starts where the previous ended; removals add up
        assert step["docs_in"] == prev
        assert step["docs_in"] - step["docs_out"] == sum(step["removed"].values())
        prev = step["docs_out"]
    assert s["filtered"]["docs"] == prev == s["dedup"]["docs_in"]
    o = s["output"]
    assert s["dedup"]["docs_out"] == o["train"]["docs"] + o["valid"]["docs"] == len(kept_ids(out))
    assert o["train"]["tokens"] == sum(os.path.getsize(os.path.join(out, "shards", f"{n}.bin")) // 2
                                       for n in o["shards"]["train"])
    assert s["tokenizer"]["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def test_stages_off_given_tokenizer_and_order(pipeline_run, dup_corpus, tmp_path):
    """Steps and dedup switched off run no such stage; tokenizer.model_path is copied byte for byte."""
    from tests.data_pipeline.conftest import run_inproc
    out, _, planted = pipeline_run
    corpus, _ = dup_corpus
    new = str(tmp_path / "o")
    res = run_inproc(corpus, new, "workers=1", "steps=[clean,length]", "length.min_chars=100", "c4.enabled=false",
                     "dedup.exact.enabled=false", "dedup.minhash.enabled=false",
                     f"tokenizer.model_path={os.path.join(out, 'tokenizer.model')}")
    s = res["stats"]
    assert [st["name"] for st in s["steps"]] == ["clean", "length"] and s["dedup"] == {}
    assert "buckets" not in res["walls"] and "clusters" not in res["walls"]
    assert open(os.path.join(new, "tokenizer.model"), "rb").read() == open(os.path.join(out, "tokenizer.model"), "rb").read()
    assert s["tokenizer"]["trained"] is False
    assert planted["exact"] in kept_ids(new)  # nothing deduplicated
    assert s["output"]["train"]["docs"] + s["output"]["valid"]["docs"] == s["input"]["docs"]


def test_unigram_tokenizer_and_multiple_shards(dup_corpus, tmp_path):
    from tests.data_pipeline.conftest import run_inproc
    from data_pipeline.shards import IndexedShard
    corpus, _ = dup_corpus
    out = str(tmp_path / "u")
    s = run_inproc(corpus, out, "workers=2", "tokenizer.model_type=unigram", "shards.target_mb=0.02")["stats"]
    names = s["output"]["shards"]["train"]
    assert len(names) > 2 and names[0] == "train-00000"
    shards = [IndexedShard(os.path.join(out, "shards", n)) for n in names]
    assert sum(sh.num_tokens for sh in shards) == s["output"]["train"]["tokens"]
    assert all(sh.num_tokens * 2 >= 0.02e6 for sh in shards[:-1])  # each closed once past the target
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert sp.vocab_size() == 320 and all(int(sh.doc(0)[-1]) == 2 for sh in shards)
