"""Megatron-compatible token shards: ``PREFIX.bin`` (token ids back to back) + ``PREFIX.idx`` (MMIDIDX v1).

The .idx layout (see megatron.core.datasets.indexed_dataset): magic ``MMIDIDX\\0\\0``, u64 version 1, u8 dtype
code, u64 sequence count S, u64 document-index length D (= documents + 1), i32[S] sequence lengths, i64[S] byte
offsets into .bin, i64[D] document starts. Here every document is one sequence, so D = S + 1.

This module is the meeting point of the two halves: the pipeline writes shards with :class:`ShardWriter`, the
trainer reads them with :class:`IndexedShard`.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from llmforge.common.atomic import note_write

MAGIC = b"MMIDIDX\x00\x00"
STATS_EXT = ".stats.json"  # sidecar: max token id, counts
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int):
    """uint16 while every id fits with a margin (Megatron's rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class ShardWriter:
    """Append documents, then ``close()`` renames ``.bin``/``.idx`` into place (nothing partial is ever visible)."""

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._bin = open(self._tmp + ".bin", "wb")
        self.lengths: list[int] = []
        self.tokens = 0
        self.max_id = -1

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(len(arr))
        self.tokens += len(arr)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once (``tokens`` back to back, ``lengths`` per document): one write and one
        max for the whole block, the same bytes as adding them one by one."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(memoryview(arr).cast("B"))
        self.lengths.extend(np.asarray(lengths).tolist())
        self.tokens += len(arr)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))

    def close(self) -> None:
        self._bin.close()
        write_index(self._tmp + ".idx", self.dtype, self.lengths)
        write_sidecar(self._tmp + STATS_EXT, self.dtype, self.tokens, len(self.lengths), self.max_id)
        for ext in (STATS_EXT, ".bin", ".idx"):
            note_write(self.prefix + ext)
        os.replace(self._tmp + STATS_EXT, self.prefix + STATS_EXT)  # first: a stale one never outlives its .bin
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for ext in (".bin", ".idx", STATS_EXT):
            if os.path.exists(self._tmp + ext):
                os.remove(self._tmp + ext)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def write_sidecar(path: str, dtype, tokens: int, documents: int, max_id: int) -> None:
    """``PREFIX.stats.json`` beside .bin/.idx (the MMIDIDX format has no room for it): the largest token id and
    counts, for people and reports; the trainer's vocabulary check reads the tokens themselves (shard_max_id)."""
    with open(path, "w") as f:
        json.dump({"dtype": np.dtype(dtype).name, "documents": documents, "max_token_id": max_id, "tokens": tokens},
                  f, sort_keys=True)
        f.write("\n")


def shard_max_id(prefix: str) -> int:
    """Largest token id in a shard (-1 if empty), read from its tokens (a memmap max, one sequential pass): the
    stats sidecar is a summary anyone can edit or get wrong, and a wrong one would let an id >= vocab_size reach
    the embedding (llmforge.data.checks caches this per file version)."""
    shard = IndexedShard(prefix)
    return int(shard.tokens.max()) if shard.num_tokens else -1


def write_index(path: str, dtype, lengths, doc_idx=None) -> None:
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    offsets = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        offsets[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dtype.itemsize
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64) if doc_idx is None else np.asarray(doc_idx, np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes())
        f.write(offsets.tobytes())
        f.write(doc_idx.tobytes())


class IndexedShard:
    """Read-only view of one shard: ``tokens`` is a memmap of the whole .bin; ``doc(i)`` one document's ids."""

    def __init__(self, prefix: str):
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]
        self.prefix = prefix
        idx_path = prefix + ".idx"
        for p in (idx_path, prefix + ".bin"):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"shard file missing: {p}")
        with open(idx_path, "rb") as f:
            head = f.read(9 + 8 + 1 + 16)
        if len(head) < 34 or head[:9] != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic)")
        version, code, s, d = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = 34 + 4 * s + 8 * s + 8 * d
        if os.path.getsize(idx_path) != expected:
            raise ValueError(f"{idx_path}: truncated or corrupt ({os.path.getsize(idx_path)} bytes, expected {expected})")
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=s, offset=34)
        self.offsets = np.frombuffer(idx, dtype=np.int64, count=s, offset=34 + 4 * s)
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=d, offset=34 + 12 * s)
        n_tokens = int(self.lengths.astype(np.int64).sum())
        bin_size = os.path.getsize(prefix + ".bin")
        if bin_size != n_tokens * self.dtype.itemsize:
            raise ValueError(f"{prefix}.bin: {bin_size} bytes but the index describes {n_tokens} tokens")
        self.tokens = (np.memmap(prefix + ".bin", mode="r", dtype=self.dtype) if n_tokens
                       else np.zeros(0, dtype=self.dtype))
        self.num_tokens = n_tokens

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> np.ndarray:
        start = int(self.offsets[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.lengths[i])])


def merge_shards(prefixes: list[str], out_prefix: str) -> None:
    """Concatenate shards (same dtype) into one, atomically."""
    shards = [IndexedShard(p) for p in prefixes]
    dtypes = {s.dtype for s in shards}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge shards with different dtypes: {sorted(map(str, dtypes))}")
    with ShardWriter(out_prefix, dtypes.pop()) as w:
        for s in shards:
            for i in range(len(s)):
                w.add_document(s.doc(i))


def find_tokenizer(paths: list[str]) -> str | None:
    """The ``tokenizer.model`` of the first data path that has one: a pipeline output dir holds it at its top, a
    shard prefix (``DIR/shards/train-00000``) two folders up or beside the shard."""
    for p in paths:
        base = p if os.path.isdir(p) else os.path.dirname(os.path.dirname(os.path.abspath(p)))
        for cand in (os.path.join(base, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(p)),
                                                                         "tokenizer.model")):
            if os.path.isfile(cand):
                return cand
    return None
