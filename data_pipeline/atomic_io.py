"""zstd-compressed jsonl written atomically; the generic atomic writes live in llmforge.common.atomic (shared by
both halves) and are re-exported here."""
from __future__ import annotations

import json
import os

import zstandard

from llmforge.common.atomic import (atomic_path, note_write, read_json, save_npy, tmp_name, write_bytes,  # noqa: F401
                                    write_json)

from .readers import open_binary

ZSTD_LEVEL = 3  # fixed: the compressed bytes are part of the byte-identical-output promise


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
        note_write(self.path)
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
