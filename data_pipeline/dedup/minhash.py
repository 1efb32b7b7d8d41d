"""MinHash LSH with datasketch: word n-gram shingles, xxh64 hashing (``scheme="affine64"``, which datasketch 2.x
requires for a 64-bit hash function), ``bands x rows`` permutations, one 64-bit key per band.

The bucket stage is a streaming k-way merge of per-task sorted band keys (as datatrove does), so memory stays
bounded by the number of tasks, not the number of documents."""
from __future__ import annotations

import heapq
import re

import numpy as np
import xxhash
from datasketch import MinHash

_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(text: str, n: int) -> set[str]:
    ws = _WORD.findall(text.lower())
    if len(ws) < n:
        return {" ".join(ws)}
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


class MinHasher:
    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        self._template = MinHash(num_perm=bands * rows, seed=seed, hashfunc=xxhash.xxh64_intdigest, scheme="affine64")

    def signature(self, text: str) -> np.ndarray:
        m = MinHash(num_perm=self.bands * self.rows, hashfunc=xxhash.xxh64_intdigest, scheme="affine64",
                    permutations=self._template.permutations)  # reuse permutations: ~15x faster than regenerating
        m.update_batch([s.encode("utf-8") for s in shingles(text, self.ngram)])
        return m.hashvalues

    def band_keys(self, text: str) -> list[int]:
        hv = self.signature(text)
        r = self.rows
        return [xxhash.xxh64_intdigest(hv[b * r:(b + 1) * r].tobytes()) for b in range(self.bands)]


def _column_stream(keys: np.ndarray, order: np.ndarray, task: int, chunk: int = 65536):
    """(key, docref) pairs of one task's sorted column, read in chunks from a memmap."""
    for s in range(0, len(keys), chunk):
        for k, i in zip(keys[s:s + chunk].tolist(), order[s:s + chunk].tolist()):
            yield k, (task << 32) | i


def bucket_pairs(columns: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Merge per-task sorted ``(task, keys, order)`` columns; for every key shared by several documents emit
    pairs (smallest docref, other docref). Returns an (n, 2) uint64 array, rows sorted."""
    merged = heapq.merge(*(_column_stream(k, o, t) for t, k, o in columns))
    pairs: list[tuple[int, int]] = []
    cur_key, first = None, None
    for key, ref in merged:
        if key == cur_key:
            pairs.append((first, ref) if first < ref else (ref, first))
            first = min(first, ref)
        else:
            cur_key, first = key, ref
    arr = np.array(sorted(set(pairs)), dtype=np.uint64).reshape(-1, 2)
    return arr
