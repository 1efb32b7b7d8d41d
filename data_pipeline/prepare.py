"""Stage ``prepare`` (one task per group of input files): read -> per-document steps (clean, filters) in the
configured order -> kept documents to ``work/prepared/<rank>.jsonl.zst`` plus their dedup keys (MinHash band
keys and the exact-content hash), sorted per column, to ``work/signatures/<rank>.{keys,order}.npy``. Also the
stage before it when decontaminate is on: ``decontaminate`` writes the evaluation n-gram index the tasks share."""
from __future__ import annotations

import functools
import time
from collections import Counter

import numpy as np

from .atomic_io import JsonlZstWriter, read_json, save_npy, write_json
from .dedup.exact import content_hash
from .dedup.minhash import MinHasher
from .filters import get_step
from .work_dirs import decontaminate_index_paths, marker_path, prepared_path, rejects_path, signature_paths, timing_path


def active_steps(cfg, work: str | None = None) -> list[tuple[str, object, object]]:
    """(name, function, section) of the enabled steps in order; ``work``: the run's work folder, where the
    decontaminate step finds its index (without it, the step builds the index in this process)."""
    out = []
    for n in cfg.steps:
        if getattr(cfg, n).enabled:
            fn = get_step(n)
            if n == "url_filter":  # the URL's field is an input key
                fn = functools.partial(fn, url_key=cfg.input.url_key)
            if n == "decontaminate" and work is not None:  # one object per task: it counts per evaluation file
                from .filters.decontaminate import DecontaminateStep, load_index
                hashes, files = load_index(*decontaminate_index_paths(work))
                n_files = len(read_json(marker_path(work, "decontaminate", 0))["files"])
                fn = DecontaminateStep(hashes, files, n_files, cfg.decontaminate.mode)
            out.append((n, fn, getattr(cfg, n)))
    return out


def decontaminate_index_task(ctx, _rank: int) -> dict:
    """Stage ``decontaminate``: the n-gram index of ``decontaminate.paths`` (filters/decontaminate.py), written
    once to work/decontaminate/ for every prepare task (they memory-map it); the marker lists the files."""
    from .filters.decontaminate import ENTRY_BYTES, build_index
    hashes, files, info = build_index(ctx.cfg.decontaminate)
    hpath, fpath = decontaminate_index_paths(ctx.work)
    save_npy(hpath, np.ascontiguousarray(hashes))
    save_npy(fpath, np.ascontiguousarray(files))
    return {"files": info, "entries": int(len(hashes)), "index_bytes": int(len(hashes)) * ENTRY_BYTES}


def dedup_columns(cfg) -> int:
    """Key columns per document: one per MinHash band, plus one for the exact hash."""
    return cfg.dedup.minhash.bands * cfg.dedup.minhash.enabled + int(cfg.dedup.exact.enabled)


def _new_step_stats() -> dict:
    return {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "removed": Counter()}


def prepare_warmup(ctx) -> None:
    if "lang" in ctx.cfg.steps and ctx.cfg.lang.enabled:
        from .filters.lang import identifier
        identifier()
    if _quality_on(ctx.cfg):  # loaded once in the parent: forked workers share it
        from .filters.quality_classifier import check
        check(ctx.cfg.quality_classifier)


def _quality_on(cfg) -> bool:
    return "quality_classifier" in cfg.steps and cfg.quality_classifier.enabled


def prepare_task(ctx, rank: int) -> dict:
    cfg = ctx.cfg
    steps = active_steps(cfg, ctx.work)
    read = Counter()
    step_stats = {name: _new_step_stats() for name, _, _ in steps}
    for name, fn, _ in steps:  # a step that counts more than removals (pii: redactions) gets a Counter
        if getattr(fn, "counts", None):
            step_stats[name]["counts"] = Counter(dict.fromkeys(fn.counts, 0))
    if "quality_classifier" in step_stats:
        from .filters.quality_classifier import HIST_BINS
        step_stats["quality_classifier"]["hist"] = {"kept": [0] * HIST_BINS, "removed": [0] * HIST_BINS}
    m = cfg.dedup.minhash
    hasher = MinHasher(m.ngram, m.bands, m.rows, m.seed) if m.enabled else None
    keys: list[list[int]] = []
    rejects = JsonlZstWriter(rejects_path(ctx.work, f"{rank:05d}")) if cfg.write_rejects else None
    reader = ctx.reader(read)  # the run context chooses: documents, or chat rows when sft.enabled
    kept_bytes = 0
    qc = cfg.quality_classifier if _quality_on(cfg) else None
    top_share = qc is not None and qc.keep_fraction < 1  # the task's top share: kept docs wait for all scores
    pending: list[tuple[dict, int]] = []
    secs = Counter()  # seconds per step: written beside the marker, never into it (markers stay reproducible)
    clock = time.perf_counter
    with JsonlZstWriter(prepared_path(ctx.work, rank)) as out:
        for kind, path, rel, lo, hi in ctx.units_of(rank):
            read["files"] += lo == 0  # a file split over tasks is counted by the piece holding its start
            docs = reader.read(kind, path, rel, lo, hi)
            while True:
                t0 = clock()
                doc = next(docs, None)
                secs["read"] += clock() - t0
                if doc is None:
                    break
                nbytes = len(doc["text"].encode("utf-8"))
                read["docs"] += 1
                read["bytes"] += nbytes
                rule = None
                for name, fn, scfg in steps:
                    st = step_stats[name]
                    st["docs_in"] += 1
                    st["bytes_in"] += nbytes
                    t0 = clock()
                    rule = fn(doc, scfg, st["counts"]) if "counts" in st else fn(doc, scfg)
                    secs[name] += clock() - t0
                    if name == "quality_classifier":
                        st["hist"]["removed" if rule else "kept"][_bin(doc)] += 1
                    if rule:
                        st["removed"][rule] += 1
                        break
                    nbytes = len(doc["text"].encode("utf-8"))
                    st["docs_out"] += 1
                    st["bytes_out"] += nbytes
                if rule:
                    if rejects:
                        rejects.write({"id": doc["id"], "rule": rule})
                    continue
                if top_share:
                    pending.append((doc, nbytes))
                    continue
                kept_bytes += nbytes
                _emit(doc, out, keys, hasher, cfg, secs, clock)
        if top_share:
            kept_bytes += _keep_top_share(pending, qc.keep_fraction, step_stats["quality_classifier"], rejects,
                                          lambda d: _emit(d, out, keys, hasher, cfg, secs, clock))
        n_kept = out.count
    if rejects:
        rejects.close()
    _save_signatures(ctx.work, rank, keys, dedup_columns(cfg))
    write_json(timing_path(ctx.work, "prepare-steps", rank),
               {k: round(v, 3) for k, v in secs.items()})
    for st in step_stats.values():
        st["removed"] = dict(sorted(st["removed"].items()))
        if "counts" in st:
            st["counts"] = dict(st["counts"])
    result = {"read": dict(sorted(read.items())), "steps": step_stats, "kept_docs": n_kept, "kept_bytes": kept_bytes}
    if qc is not None:
        result["quality"] = step_stats["quality_classifier"].pop("hist")
    for name, fn, _ in steps:
        if name == "decontaminate":  # documents per evaluation file (their numbers: the index stage's marker)
            result["decontaminate"] = {"contaminated_by": list(fn.contaminated_by)}
    return result


def _emit(doc, out, keys, hasher, cfg, secs, clock) -> None:
    """A kept document: to work/prepared and its dedup keys to the task's signature rows."""
    out.write(doc)
    t0 = clock()
    row = hasher.band_keys(doc["text"]) if hasher else []
    if cfg.dedup.exact.enabled:
        row.append(content_hash(doc["text"]))
    keys.append(row)
    secs["dedup_keys"] += clock() - t0


def _keep_top_share(pending, fraction, st, rejects, emit) -> int:
    """quality_classifier.keep_fraction: of the task's scored documents (all its other steps passed), keep the
    top share by score (ties: document order) in document order; the rest count as removed by the step."""
    from .filters.quality_classifier import select_top
    keep = select_top([d["meta"]["quality_score"] for d, _ in pending], fraction)
    kept_bytes = 0
    for (doc, nbytes), k in zip(pending, keep):
        if k:
            kept_bytes += nbytes
            emit(doc)
            continue
        st["docs_out"] -= 1
        st["bytes_out"] -= nbytes
        st["removed"]["quality_classifier.keep_fraction"] += 1
        st["hist"]["removed"][_bin(doc)] += 1
        st["hist"]["kept"][_bin(doc)] -= 1
        if rejects:
            rejects.write({"id": doc["id"], "rule": "quality_classifier.keep_fraction"})
    return kept_bytes


def _bin(doc) -> int:
    from .filters.quality_classifier import hist_bin
    return hist_bin(doc["meta"]["quality_score"])


def _save_signatures(work: str, rank: int, keys: list[list[int]], ncols: int) -> None:
    """Per column: keys sorted ascending (stable, so equal keys keep document order) and the document order."""
    mat = np.array(keys, dtype=np.uint64).reshape(len(keys), ncols).T  # (ncols, n)
    order = np.argsort(mat, axis=1, kind="stable").astype(np.uint32)
    sorted_keys = np.take_along_axis(mat, order.astype(np.int64), axis=1)
    kpath, opath = signature_paths(work, rank)
    save_npy(kpath, np.ascontiguousarray(sorted_keys))
    save_npy(opath, np.ascontiguousarray(order))
