"""MinHash LSH with datasketch: word n-gram shingles, xxh64 hashing (``scheme="affine64"``, which datasketch 2.x
requires for a 64-bit hash function), ``bands x rows`` permutations, one 64-bit key per band.

Buckets are found per key range (dedup/stages.py): each range of every band is a slice of the per-task sorted
band keys, so one bucket task holds about 1/``cluster_tasks`` of the keys."""
from __future__ import annotations

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


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """The shingle set as sorted 64-bit hashes: 8 bytes a shingle instead of a Python string (what the
    verification and precision checks hold in memory)."""
    return np.unique(np.fromiter((xxhash.xxh64_intdigest(s.encode("utf-8")) for s in shingles(text, n)), np.uint64))


def jaccard_hashed(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


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


def bucket_edges(keys: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Buckets of one band (documents with equal keys): for each member but the first (smallest global
    document index) an edge ``(head, member)``. Vectorised; ``docs`` are global indices (input order)."""
    if len(keys) < 2:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    order = np.lexsort((docs, keys))
    k, d = keys[order], docs[order]
    starts = np.ones(len(k), bool)
    starts[1:] = k[1:] != k[:-1]
    head_pos = np.maximum.accumulate(np.where(starts, np.arange(len(k)), 0))
    member = ~starts
    return d[head_pos[member]].astype(np.uint64), d[member].astype(np.uint64)


def pair_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mix (splitmix64) of a document pair: picks the precision sample independently of tasks."""
    with np.errstate(over="ignore"):
        z = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
