"""Atomic file writes (temp name in the same folder, then rename) and zstd-compressed jsonl."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import zstandard

from .readers import open_binary

ZSTD_LEVEL = 3  # fixed: the compressed bytes are part of the byte-identical-output promise


def tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temp path; rename it to ``path`` only if the block succeeds."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


class JsonlZstWriter:
    """Write one JSON object per line into ``path`` (zstd), atomically on close()."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = tmp_name(path)
        self._raw = open(self._tmp, "wb")
        self._z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(self._raw, closefd=False)
        self.count = 0

    def write(self, obj) -> None:
        self._z.write((json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        self._z.close()
        self._raw.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._raw.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def read_jsonl(path: str):
    with open_binary(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
