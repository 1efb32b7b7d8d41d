"""Which input pieces each task reads: the inputs, laid end to end in sorted order, are cut into ``n_tasks``
contiguous ranges of about equal bytes.

A plain (uncompressed) jsonl file is split at byte offsets (a piece reads the lines that *start* in its range)
and a parquet file at row-group boundaries, so ``workers=N`` keeps N cores busy on one big file. Compressed
files, text/HTML files and datasets folders cannot be entered in the middle: each goes whole to the task whose
range holds its first byte. Because tasks are contiguous in input order, concatenating their outputs in task
order gives the documents in input order whatever the number of tasks: outputs do not depend on it. So the
automatic count may follow ``workers`` (at least one task per worker when a file can be split).
"""
from __future__ import annotations

import bisect
import math
import os

MAX_AUTO_TASKS = 64
Piece = tuple  # (kind, path, rel, lo, hi): hi None = to the end; lo/hi are bytes (jsonl) or row groups (parquet)


def splittable(kind: str, path: str) -> bool:
    return (kind == "jsonl" and not path.lower().endswith((".gz", ".zst"))) or kind == "parquet"


def _size(kind: str, path: str) -> int:
    if kind == "hf_hub" or not os.path.exists(path):
        return 0
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
    return os.path.getsize(path)


def parquet_group_offsets(path: str) -> list[int] | None:
    """Where each row group starts, in bytes scaled to the file size (the first is 0); None if the footer cannot be read (the reader
    then reports the file, whole, in one task)."""
    try:
        import pyarrow.parquet as pq
        md = pq.ParquetFile(path).metadata
    except Exception:  # noqa: BLE001 - any unreadable file: not split, the reader names the error
        return None
    offsets, end = [], 1
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        cols = [rg.column(i) for i in range(rg.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols]
        offsets.append(min(starts) if starts else 0)
        end = max([end] + [s + c.total_compressed_size for s, c in zip(starts, cols)])
    if offsets:
        offsets[0] = 0
    # Spread over the whole file (the footer holds no rows), so that every task's range gets row groups.
    size = os.path.getsize(path)
    return [o * size // end for o in offsets]


def auto_tasks(units: list[tuple], task_mb: float, workers: int = 1) -> int:
    """One task per unsplittable unit plus one per ``task_mb`` of each splittable file, and at least ``workers``
    when some file can be split (a 28 MB jsonl under task_mb=32 would keep one core busy), at most 64. Outputs do
    not depend on the count (tasks are contiguous in input order); a resumed run keeps the count it began with
    (pipeline.Context), so another worker count on the rerun does not start over."""
    n, can_split = 0, False
    for kind, path, _ in units:
        if splittable(kind, path) and _size(kind, path) > 0:
            can_split = True
            n += max(1, math.ceil(_size(kind, path) / (task_mb * 1e6)))
        else:
            n += 1
    if can_split:
        n = max(n, workers)
    return max(1, min(n, MAX_AUTO_TASKS))


def auto_cluster_tasks(units: list[tuple], task_mb: float) -> int:
    """Dedup bucket tasks: one per ``task_mb`` of input (bytes on disk), at most 64, so that each holds a
    bounded share of the keys as the corpus grows."""
    total = sum(_size(k, p) for k, p, _ in units)
    return max(1, min(math.ceil(total / (task_mb * 1e6)), MAX_AUTO_TASKS))


def plan_tasks(units: list[tuple], n_tasks: int) -> list[list[Piece]]:
    sizes = [_size(k, p) for k, p, _ in units]
    total = sum(sizes)
    bounds = [total * t // n_tasks for t in range(n_tasks + 1)]

    def owner(pos: int) -> int:
        return min(max(bisect.bisect_right(bounds, pos) - 1, 0), n_tasks - 1)

    tasks: list[list[Piece]] = [[] for _ in range(n_tasks)]
    off = 0
    for (kind, path, rel), size in zip(units, sizes):
        groups = parquet_group_offsets(path) if kind == "parquet" else None
        if kind == "jsonl" and splittable(kind, path) and size > 0:
            first, last = owner(off), owner(off + size - 1)
            for t in range(first, last + 1):
                lo = max(bounds[t], off) - off
                tasks[t].append((kind, path, rel, lo, None if t == last else min(bounds[t + 1], off + size) - off))
        elif groups:
            owners = [owner(off + g) for g in groups]
            start = 0
            for g in range(1, len(groups) + 1):  # consecutive row groups of one task form one piece
                if g == len(groups) or owners[g] != owners[start]:
                    tasks[owners[start]].append((kind, path, rel, start, None if g == len(groups) else g))
                    start = g
        else:
            tasks[owner(off)].append((kind, path, rel, 0, None))
        off += size
    return tasks
