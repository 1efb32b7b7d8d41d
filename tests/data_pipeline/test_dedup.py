"""MinHash LSH and exact dedup: planted near duplicates found, distinct documents not; survivors and kept
ids independent of worker and task counts."""
from __future__ import annotations

import json
import os

import numpy as np
from tests.data_pipeline.conftest import kept_ids, run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, near_duplicate

from data_pipeline.dedup.exact import content_hash
from data_pipeline.dedup.minhash import MinHasher, bucket_edges, jaccard, shingles
from data_pipeline.dedup.unionfind import components, forest


def test_minhash_collides_for_near_duplicates_only():
    h = MinHasher(5, 14, 8, 1)
    base = [document(1000 + i) for i in range(60)]
    keys = [h.band_keys(t) for t in base]
    for i, t in enumerate(base[:20]):
        near = near_duplicate(t, i)
        assert jaccard(shingles(t, 5), shingles(near, 5)) > 0.75
        assert set(h.band_keys(near)) & set(keys[i]), f"near duplicate {i} missed"
    for i in range(len(base)):
        for j in range(i + 1, len(base)):
            assert not set(keys[i]) & set(keys[j]), f"distinct docs {i}, {j} collided"


def test_exact_hash_normalises_case_and_space():
    assert content_hash("Hello  World\n") == content_hash("hello world")
    assert content_hash("hello world") != content_hash("hello world!")


def test_bucket_edges_link_each_member_to_the_first_document():
    keys = np.array([9, 5, 1, 9, 5, 9, 7], np.uint64)
    docs = np.array([40, 11, 3, 12, 30, 25, 8], np.uint64)  # global indices (input order)
    head, member = bucket_edges(keys, docs)
    assert sorted(zip(head.tolist(), member.tolist())) == [(11, 30), (12, 25), (12, 40)]


def test_components_root_is_smallest_node():
    nodes, labels, roots = components(np.array([5, 3, 1], np.uint64), np.array([3, 9, 2], np.uint64))
    assert nodes.tolist() == [1, 2, 3, 5, 9] and roots[labels].tolist() == [1, 1, 3, 3, 3]
    node, root = forest(np.array([5, 3, 1], np.uint64), np.array([3, 9, 2], np.uint64))
    assert list(zip(node.tolist(), root.tolist())) == [(2, 1), (5, 3), (9, 3)]


def test_kept_ids_independent_of_workers_and_tasks(dup_corpus, tmp_path):
    corpus, planted = dup_corpus
    outs = {}
    for name, extra in [("w1", ["workers=1"]), ("w2", ["workers=2"]), ("t2", ["workers=2", "tasks=2"])]:
        outs[name] = str(tmp_path / name)
        run_inproc(corpus, outs[name], *extra)
    ids = {k: kept_ids(v) for k, v in outs.items()}
    assert ids["w1"] == ids["w2"]
    assert ids["t2"] == ids["w1"]  # another task count: same documents in the same order
    assert planted["exact"] not in ids["t2"] and planted["originals"][0] in ids["t2"]
    # same input + config + task count: every output byte identical, whatever the worker count (the resolved
    # config.yaml records output_dir and workers themselves, so it is left out)
    h1, h2 = (tree_hashes(outs[k], skip=("work/timings", "config.yaml", "work/config.yaml")) for k in ("w1", "w2"))
    assert h1 == h2 and len(h1) > 20


def test_verification_and_rejects(dup_corpus, tmp_path):
    corpus, planted = dup_corpus
    out = str(tmp_path / "v")
    run_inproc(corpus, out, "workers=1", "dedup.minhash.verify=true", "dedup.minhash.threshold=0.99",
               "write_rejects=true")
    s = json.load(open(os.path.join(out, "stats.json")))["dedup"]["minhash"]
    assert s["verified"] and s["candidate_pairs"] >= 2 and s["pairs_checked"] == s["candidate_pairs"]
    assert s["removed"] == 0 and s["pairs_above_threshold"] == 0  # no planted pair is 99% similar
    from data_pipeline.atomic_io import read_jsonl
    rejects = list(read_jsonl(os.path.join(out, "work", "rejects", "dedup.jsonl.zst")))
    assert rejects == [{"id": planted["exact"], "rule": "dedup.exact"}]
