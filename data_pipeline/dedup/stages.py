"""Dedup stages: ``buckets`` (``cluster_tasks`` tasks: a partitioned union-find over one range of bucket keys)
then ``clusters`` (one merge task).

Documents are numbered globally in input order (``g``: prepare task offset + index), which never depends on
the task counts. Bucket task p takes the keys in [p, p+1) * 2**64 / P of every key column (a binary-searched
slice of each prepare task's sorted column, so it holds ~1/P of the keys), forms the buckets, drops MinHash
pairs that are exact duplicates anyway, optionally verifies pairs by exact shingle Jaccard, and reduces its
edges to a forest (node -> smallest node of its component: at most one edge per document). The merge joins the
forests: every component keeps its first document (exact copies are removed as ``dedup.exact``, the rest of
the component as ``dedup.minhash``) and writes per-task removal lists.

Memory: a bucket task ~ 16 bytes x (documents / P) per column, one column at a time; the merge ~ tens of bytes
per document that has a duplicate (numpy arrays, no per-document Python objects but the ids of written clusters).
"""
from __future__ import annotations

import os
import numpy as np

from ..atomic_io import JsonlZstWriter, atomic_path, read_jsonl, save_npy
from ..executor import stage_results
from ..work_dirs import prepared_path, signature_paths
from .minhash import bucket_edges, jaccard_hashed, pair_hash, shingle_hashes
from .unionfind import components, forest
from ..work_dirs import clusters_path, part_path, rejects_path, remove_path

EMPTY = np.zeros(0, np.uint64)


def load_removed(work: str, rank: int) -> set[int]:
    p = remove_path(work, rank)
    return set(np.load(p).tolist()) if os.path.exists(p) else set()


def doc_offsets(ctx) -> np.ndarray:
    """Global index of each prepare task's first kept document (and the total at the end)."""
    return np.concatenate([[0], np.cumsum([s["kept_docs"] for s in ctx.prepare_stats])]).astype(np.uint64)


def _columns(ctx, t: int):
    kpath, opath = signature_paths(ctx.work, t)
    return np.load(kpath, mmap_mode="r"), np.load(opath, mmap_mode="r")


def _key_slice(ctx, col: int, p: int, n_parts: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, global doc index) of column ``col`` whose keys fall in partition p, over every prepare task."""
    lo, hi = (p << 64) // n_parts, ((p + 1) << 64) // n_parts
    keys, docs = [], []
    for t in range(ctx.n_tasks):
        if ctx.prepare_stats[t]["kept_docs"] == 0:
            continue
        k, o = _columns(ctx, t)
        row = k[col]
        a = int(np.searchsorted(row, np.uint64(lo), "left"))
        b = len(row) if hi >= 1 << 64 else int(np.searchsorted(row, np.uint64(hi), "left"))
        keys.append(np.asarray(row[a:b]))
        docs.append(np.asarray(o[col][a:b]).astype(np.uint64) + offsets[t])
    if not keys:
        return EMPTY, EMPTY
    return np.concatenate(keys), np.concatenate(docs)


def _task_of(g: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, g, "right") - 1


def _exact_keys(ctx, g: np.ndarray, offsets: np.ndarray, col: int) -> np.ndarray:
    """The exact-content key of each document g (inverting each task's sort order for the exact column)."""
    out = np.zeros(len(g), np.uint64)
    tasks = _task_of(g, offsets)
    for t in np.unique(tasks):
        sel = tasks == t
        k, o = _columns(ctx, int(t))
        inv = np.empty(o.shape[1], np.int64)
        inv[np.asarray(o[col])] = np.arange(o.shape[1])
        out[sel] = np.asarray(k[col])[inv[(g[sel] - offsets[t]).astype(np.int64)]]
    return out


def read_fields(ctx, g: np.ndarray, offsets: np.ndarray, field: str) -> dict[int, object]:
    """g -> the document's id (``field="id"``) or hashed shingle set (``"shingles"``), streaming only the prepare
    outputs that hold the wanted documents."""
    want = np.unique(g.astype(np.uint64))
    tasks = _task_of(want, offsets)
    out = {}
    n = ctx.cfg.dedup.minhash.ngram
    for t in np.unique(tasks):
        local = set((want[tasks == t] - offsets[t]).tolist())
        for i, doc in enumerate(read_jsonl(prepared_path(ctx.work, int(t)))):
            if i in local:
                out[int(offsets[t]) + i] = doc["id"] if field == "id" else shingle_hashes(doc["text"], n)
                local.discard(i)
                if not local:
                    break
    return out


def buckets_task(ctx, p: int) -> dict:
    cfg, m = ctx.cfg, ctx.cfg.dedup.minhash
    offsets = doc_offsets(ctx)
    n_cols, n_parts = ctx.n_dedup_cols, ctx.n_cluster_tasks
    exact_col = n_cols - 1 if cfg.dedup.exact.enabled else None
    widest = 0  # the most keys held at once: the task's memory, ~ documents / P

    def edges(col):
        nonlocal widest
        keys, docs = _key_slice(ctx, col, p, n_parts, offsets)
        widest = max(widest, len(keys))
        return bucket_edges(keys, docs)

    ex_head, ex_member = edges(exact_col) if exact_col is not None else (EMPTY, EMPTY)
    heads, members = [], []
    for col in range(n_cols):
        if col != exact_col:
            h, mem = edges(col)
            heads.append(h)
            members.append(mem)
    near_h = np.concatenate(heads) if heads else EMPTY
    near_m = np.concatenate(members) if members else EMPTY
    if exact_col is not None and len(near_h):  # exact copies are joined by their exact edge already
        keep = _exact_keys(ctx, near_h, offsets, exact_col) != _exact_keys(ctx, near_m, offsets, exact_col)
        near_h, near_m = near_h[keep], near_m[keep]
    stats = {"exact_clusters": int(len(np.unique(ex_head))), "exact_removed": int(len(ex_member)),
             "candidate_pairs": int(len(near_h))}  # band collisions: a pair sharing 3 bands counts 3 times
    pairs, band_pair = np.unique(np.stack([near_h, near_m], axis=1), axis=0, return_inverse=True)
    if m.verify:
        sh = read_fields(ctx, pairs.ravel(), offsets, "shingles") if len(pairs) else {}
        ok = np.array([jaccard_hashed(sh[a], sh[b]) >= m.threshold for a, b in pairs.tolist()], bool)
        # every band collision is checked (it passes if its pair does): counts that no partitioning changes
        stats.update(pairs_checked=int(len(near_h)), pairs_above_threshold=int(ok[band_pair.ravel()].sum()))
        near_h, near_m = pairs[ok, 0], pairs[ok, 1]
    sample = pairs[np.lexsort((pairs[:, 1], pairs[:, 0], pair_hash(pairs[:, 0], pairs[:, 1])))][: m.precision_sample] \
        if not m.verify else pairs[:0]
    node, root = forest(np.concatenate([ex_head, near_h]), np.concatenate([ex_member, near_m]))
    with atomic_path(part_path(ctx.work, p)) as tmp, open(tmp, "wb") as f:
        np.savez(f, node=node, root=root, ex_head=ex_head, ex_member=ex_member, sample=sample)
    stats.update(forest_edges=int(len(node)), keys_max_column=widest)
    return stats


def clusters_task(ctx, _rank: int) -> dict:
    cfg, work, m = ctx.cfg, ctx.work, ctx.cfg.dedup.minhash
    offsets = doc_offsets(ctx)
    parts = [np.load(part_path(work, p)) for p in range(ctx.n_cluster_tasks)]
    cat = lambda k: np.concatenate([x[k] for x in parts]) if parts else EMPTY  # noqa: E731
    ex_head, ex_member = cat("ex_head"), cat("ex_member")
    nodes, labels, roots = components(cat("node"), cat("root"))
    samples = np.concatenate([x["sample"] for x in parts]) if parts else np.zeros((0, 2), np.uint64)
    del parts
    root = roots[labels]
    removed = nodes[nodes != root]
    is_exact = np.isin(removed, ex_member)
    is_rep = ~np.isin(nodes, ex_member)  # exact-cluster survivors: the documents MinHash clusters count
    per_label = np.bincount(labels[is_rep], minlength=len(roots)) if len(nodes) else np.zeros(0, np.int64)
    near_clusters = int((per_label >= 2).sum())
    largest = int(per_label.max()) if len(per_label) and near_clusters else 0

    tasks = _task_of(removed, offsets)
    for t in range(ctx.n_tasks):
        save_npy(remove_path(work, t), np.sort((removed[tasks == t] - offsets[t]).astype(np.uint32)))

    bands = stage_results(work, "buckets", ctx.n_cluster_tasks)
    if m.verify:
        checked, above = (sum(b.get(k, 0) for b in bands) for k in ("pairs_checked", "pairs_above_threshold"))
    else:  # the precision_sample pairs with the smallest pair hash, over all partitions
        samples = np.unique(samples, axis=0) if len(samples) else samples
        samples = samples[np.lexsort((samples[:, 1], samples[:, 0], pair_hash(samples[:, 0], samples[:, 1])))]
        samples = samples[: m.precision_sample]
        sh = read_fields(ctx, samples.ravel(), offsets, "shingles") if len(samples) else {}
        checked = len(samples)
        above = sum(jaccard_hashed(sh[a], sh[b]) >= m.threshold for a, b in samples.tolist())
    if cfg.dedup.write_clusters or cfg.write_rejects:
        _write_clusters(ctx, offsets, ex_head, ex_member, removed[~is_exact], root[nodes != root][~is_exact],
                        removed, is_exact)
    return {
        "exact": {"enabled": cfg.dedup.exact.enabled, "clusters": sum(b["exact_clusters"] for b in bands),
                  "removed": int(is_exact.sum())},
        "minhash": {"enabled": m.enabled, "bands": m.bands, "rows": m.rows, "ngram": m.ngram,
                    "candidate_pairs": sum(b["candidate_pairs"] for b in bands), "pairs_checked": int(checked),
                    "pairs_above_threshold": int(above),
                    "precision_estimate": round(above / checked, 4) if checked else None,
                    "verified": m.verify, "clusters": near_clusters, "largest_cluster": largest,
                    "removed": int((~is_exact).sum())},
    }


def _write_clusters(ctx, offsets, ex_head, ex_member, near_removed, near_keep, removed, is_exact) -> None:
    """clusters.jsonl.zst (exact then MinHash clusters, each by its kept document in input order) and the
    dedup rejects; only these need document ids."""
    cfg, work = ctx.cfg, ctx.work
    ids = read_fields(ctx, np.concatenate([ex_head, ex_member, near_removed, near_keep]), offsets, "id")
    if cfg.dedup.write_clusters:
        with JsonlZstWriter(clusters_path(work)) as w:
            for kind, keep, member in (("exact", ex_head, ex_member), ("minhash", near_keep, near_removed)):
                order = np.lexsort((member, keep))
                keep, member = keep[order].tolist(), member[order].tolist()
                i = 0
                while i < len(keep):
                    j = i
                    while j < len(keep) and keep[j] == keep[i]:
                        j += 1
                    w.write({"kind": kind, "keep": ids[keep[i]], "remove": [ids[x] for x in member[i:j]]})
                    i = j
    if cfg.write_rejects:
        with JsonlZstWriter(rejects_path(work, "dedup")) as w:
            for g, exact in zip(removed.tolist(), is_exact.tolist()):
                w.write({"id": ids[g], "rule": "dedup.exact" if exact else "dedup.minhash"})
