"""Dedup stages. ``buckets`` (one task per key column): k-way merge of every prepare task's sorted column ->
duplicate pairs. ``clusters`` (one task): union-find over the pairs (exact first, then MinHash candidates
between exact survivors), survivor = the smallest document id of each cluster (independent of task and worker
counts), optional exact-Jaccard verification, precision estimate; writes per-task removal lists.

Memory: the bucket merge holds one chunk per task; clustering holds only documents that have a duplicate."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import xxhash

from ..atomic_io import JsonlZstWriter, read_jsonl, save_npy
from ..prepare import prepared_path, signature_paths
from .minhash import bucket_pairs, jaccard, shingles
from .unionfind import UnionFind


def pairs_path(work: str, col: int) -> str:
    return os.path.join(work, "dedup", f"pairs-{col:05d}.npy")


def remove_path(work: str, rank: int) -> str:
    return os.path.join(work, "dedup", f"remove-{rank:05d}.npy")


def load_removed(work: str, rank: int) -> set[int]:
    p = remove_path(work, rank)
    return set(np.load(p).tolist()) if os.path.exists(p) else set()


def buckets_task(ctx, col: int) -> dict:
    columns = []
    for t in range(ctx.n_tasks):
        if ctx.prepare_stats[t]["kept_docs"] == 0:
            continue
        kpath, opath = signature_paths(ctx.work, t)
        keys, order = np.load(kpath, mmap_mode="r"), np.load(opath, mmap_mode="r")
        columns.append((t, keys[col], order[col]))
    pairs = bucket_pairs(columns)
    save_npy(pairs_path(ctx.work, col), pairs)
    return {"pairs": int(len(pairs))}


def _read_docs(ctx, refs: set[int], want_text: bool) -> dict[int, object]:
    """docref -> id (or shingle set) for the given refs, streaming only the prepare outputs that hold them."""
    by_task: dict[int, set[int]] = {}
    for ref in refs:
        by_task.setdefault(ref >> 32, set()).add(ref & 0xFFFFFFFF)
    out = {}
    n = ctx.cfg.dedup.minhash.ngram
    for t in sorted(by_task):
        wanted = by_task[t]
        for i, doc in enumerate(read_jsonl(prepared_path(ctx.work, t))):
            if i in wanted:
                out[(t << 32) | i] = shingles(doc["text"], n) if want_text else doc["id"]
                if len(out) == len(refs):
                    break
    return out


def _clusters(pairs: np.ndarray) -> list[list[int]]:
    uf = UnionFind()
    for a, b in pairs.tolist():
        uf.union(a, b)
    return list(uf.clusters().values())


def clusters_task(ctx, _rank: int) -> dict:
    cfg, work = ctx.cfg, ctx.work
    m = cfg.dedup.minhash
    n_cols = ctx.n_dedup_cols
    exact_col = n_cols - 1 if cfg.dedup.exact.enabled else None
    load = lambda c: np.load(pairs_path(work, c))  # noqa: E731
    exact_pairs = load(exact_col) if exact_col is not None else np.zeros((0, 2), np.uint64)
    near_cols = [c for c in range(n_cols) if c != exact_col]
    near_pairs = np.concatenate([load(c) for c in near_cols]) if near_cols else np.zeros((0, 2), np.uint64)
    refs = set(exact_pairs.ravel().tolist()) | set(near_pairs.ravel().tolist())
    ids = _read_docs(ctx, refs, want_text=False)

    removed: dict[int, str] = {}  # docref -> rule
    cluster_rows = []
    rep: dict[int, int] = {}  # docref -> its exact-cluster survivor
    exact_clusters = _clusters(exact_pairs)
    for members in exact_clusters:
        keep = min(members, key=lambda r: ids[r])
        for r in members:
            rep[r] = keep
            if r != keep:
                removed[r] = "dedup.exact"
        cluster_rows.append({"kind": "exact", "keep": ids[keep], "remove": sorted(ids[r] for r in members if r != keep)})

    cand = {tuple(sorted((rep.get(a, a), rep.get(b, b)))) for a, b in near_pairs.tolist()}
    cand = sorted(p for p in cand if p[0] != p[1])
    # Deterministic sample of candidate pairs for the exact-Jaccard check (all of them when verifying).
    ranked = sorted(cand, key=lambda p: xxhash.xxh64_intdigest(np.array(p, np.uint64).tobytes()))
    checked = ranked if m.verify else ranked[: m.precision_sample]
    sh = _read_docs(ctx, {r for p in checked for r in p}, want_text=True) if checked else {}
    sims = {p: jaccard(sh[p[0]], sh[p[1]]) for p in checked}
    true_pairs = sum(s >= m.threshold for s in sims.values())
    if m.verify:
        cand = [p for p in cand if sims[p] >= m.threshold]
    near_clusters = _clusters(np.array(cand, dtype=np.uint64).reshape(-1, 2))
    largest = 0
    for members in near_clusters:
        keep = min(members, key=lambda r: ids[r])
        largest = max(largest, len(members))
        for r in members:
            if r != keep:
                removed[r] = "dedup.minhash"
        cluster_rows.append({"kind": "minhash", "keep": ids[keep], "remove": sorted(ids[r] for r in members if r != keep)})

    by_task: dict[int, list[int]] = {t: [] for t in range(ctx.n_tasks)}
    for r in removed:
        by_task[r >> 32].append(r & 0xFFFFFFFF)
    for t, idx in by_task.items():
        save_npy(remove_path(work, t), np.array(sorted(idx), dtype=np.uint32))
    if cfg.dedup.write_clusters:
        with JsonlZstWriter(os.path.join(work, "dedup", "clusters.jsonl.zst")) as w:
            for row in sorted(cluster_rows, key=lambda c: (c["kind"], c["keep"])):
                w.write(row)
    if cfg.write_rejects:
        with JsonlZstWriter(os.path.join(work, "rejects", "dedup.jsonl.zst")) as w:
            for r in sorted(removed, key=lambda r: ids[r]):
                w.write({"id": ids[r], "rule": removed[r]})
    rules = Counter(removed.values())
    return {
        "exact": {"enabled": cfg.dedup.exact.enabled, "clusters": len(exact_clusters), "removed": rules["dedup.exact"]},
        "minhash": {"enabled": m.enabled, "bands": m.bands, "rows": m.rows, "ngram": m.ngram,
                    "candidate_pairs": len(ranked), "pairs_checked": len(checked),
                    "pairs_above_threshold": int(true_pairs),
                    "precision_estimate": round(true_pairs / len(checked), 4) if checked else None,
                    "verified": m.verify, "clusters": len(near_clusters), "largest_cluster": largest,
                    "removed": rules["dedup.minhash"]},
    }
