"""Dedup clustering as many tasks: bucket-key ranges (a partitioned union-find) then one merge. The removals,
cluster file and dedup stats do not depend on the number of cluster tasks; each bucket task holds only its
share of the keys, and the merge gets at most one forest edge per duplicated document and partition."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tests.data_pipeline.conftest import run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, near_duplicate, write_jsonl


def _chain_corpus(root: str) -> dict:
    """A near-duplicate chain (a~b~c but a, c further apart), an exact copy of a chain member, an exact pair
    whose copies are also near a third document, and unique filler, over three files."""
    base = [document(9000 + i) for i in range(60)]
    a = base[0]
    b = near_duplicate(a, 1, n_changes=4)
    c = near_duplicate(b, 2, n_changes=4)
    files = {
        "f0.jsonl": [{"text": t} for t in base[:30]],
        "f1.jsonl": [{"text": b}] + [{"text": t} for t in base[30:]] + [{"text": base[5].upper()}],
        "f2.jsonl": [{"text": c}, {"text": "  " + b}, {"text": near_duplicate(base[5], 3)}],
    }
    for name, recs in files.items():
        write_jsonl(os.path.join(root, name), recs)
    return files


def _dedup_outputs(out: str) -> dict:
    files = {p: h for p, h in tree_hashes(out).items()
             if p.startswith(("work/dedup/remove-", "work/dedup/clusters", "shards", "doc_ids", "work/rejects/dedup"))}
    return {"files": files, "dedup": json.load(open(os.path.join(out, "stats.json")))["dedup"]}


@pytest.mark.slow
def test_cluster_task_count_changes_nothing(tmp_path):
    corpus = str(tmp_path / "c")
    _chain_corpus(corpus)
    outs = {}
    for p in (1, 8):
        outs[p] = str(tmp_path / f"p{p}")
        run_inproc(corpus, outs[p], "workers=2", f"dedup.cluster_tasks={p}", "write_rejects=true")
    ref = _dedup_outputs(outs[1])
    assert len(ref["files"]) >= 6
    assert _dedup_outputs(outs[8]) == ref
    d = ref["dedup"]
    # exact: " "+b ~ b and base[5].upper() ~ base[5]; MinHash: the chain {a, b, c} and base[5] ~ its near copy
    assert d["exact"] == {"enabled": True, "clusters": 2, "removed": 2}
    assert d["minhash"]["removed"] == 3 and d["minhash"]["clusters"] == 2 and d["minhash"]["largest_cluster"] == 3
    from data_pipeline.atomic_io import read_jsonl
    rows = list(read_jsonl(os.path.join(outs[8], "work", "dedup", "clusters.jsonl.zst")))
    assert rows == [{"kind": "exact", "keep": "f0.jsonl:6", "remove": ["f1.jsonl:32"]},
                    {"kind": "exact", "keep": "f1.jsonl:1", "remove": ["f2.jsonl:2"]},
                    {"kind": "minhash", "keep": "f0.jsonl:1", "remove": ["f1.jsonl:1", "f2.jsonl:1"]},
                    {"kind": "minhash", "keep": "f0.jsonl:6", "remove": ["f2.jsonl:3"]}]
    # each of the 8 bucket tasks saw about 1/8 of every key column; the merge got forests, not pairs
    markers = os.path.join(outs[8], "work", "markers", "buckets")
    parts = [json.load(open(os.path.join(markers, n))) for n in sorted(os.listdir(markers))]
    n_docs = json.load(open(os.path.join(outs[8], "stats.json")))["dedup"]["docs_in"]
    assert len(parts) == 8 and max(p["keys_max_column"] for p in parts) < n_docs / 3
    assert sum(p["keys_max_column"] for p in parts) >= n_docs
    forest = [np.load(os.path.join(outs[8], "work", "dedup", f"part-{p:05d}.npz")) for p in range(8)]
    assert all(len(f["node"]) <= 5 for f in forest)  # at most one edge per duplicated document


def test_verify_drops_chain_links_below_threshold(tmp_path):
    corpus = str(tmp_path / "c")
    _chain_corpus(corpus)
    out = str(tmp_path / "v")
    s = run_inproc(corpus, out, "workers=1", "dedup.cluster_tasks=2", "dedup.minhash.verify=true",
                   "dedup.minhash.threshold=0.99")["stats"]["dedup"]
    assert s["exact"]["removed"] == 2 and s["minhash"]["removed"] == 0
    assert s["minhash"]["pairs_checked"] == s["minhash"]["candidate_pairs"] > 0
    assert s["minhash"]["pairs_above_threshold"] == 0
