"""Readers: turn input paths into a stream of documents ``{"id", "text", "meta"}``.

Supported: jsonl (plain, .gz, .zst), parquet, Hugging Face datasets (``load_dataset("json"/"parquet")`` on
local files, ``load_from_disk`` folders, a Hub name via ``input.hf_dataset``), folders of .txt/.md/.rst, and
HTML (.html/.htm, text extracted with trafilatura). Ids are stable: ``<file relative to the inputs' common
folder>:<line>`` (jsonl, 1-based) or ``:<row>`` (parquet/HF, 0-based), or the relative file name for a
text/HTML file; they travel through every stage. A bad record raises :class:`InputError` naming file and line,
or is counted under ``read_errors`` when ``input.on_error: skip``.
"""
from __future__ import annotations

import errno
import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from typing import Iterator

import zstandard

from .config import ConfigError, InputConfig

JSONL_EXT = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
PARQUET_EXT = (".parquet",)
TEXT_EXT = (".txt", ".md", ".rst")
HTML_EXT = (".html", ".htm")
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class InputError(Exception):
    """A bad input record; the message names the file and line/row."""


class CompressionError(InputError):
    """Raised by the zstd reader; the jsonl reader adds the line number."""


class _ZstdRaw(io.RawIOBase):
    """Streaming zstd decoder over a file that raises on truncation (zstandard's stream_reader reads a cut
    frame as a silent short file). Handles multi-frame files. The input is fed in small slices, so when the file
    is damaged everything decoded before the damage is returned first and the error comes after it: with
    ``input.on_error: skip`` only the documents after the damage are lost (at worst one zstd block before it)."""

    SLICE = 1 << 14

    def __init__(self, path: str):
        self._f = open(path, "rb")
        self._path = path
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._done = False
        self._error: CompressionError | None = None

    def readable(self):
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        for i in range(0, len(data), self.SLICE):
            piece = data[i:i + self.SLICE]
            while piece:
                if self._d.eof:  # a new frame starts here
                    self._d = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out.append(self._d.decompress(piece))
                except zstandard.ZstdError as e:
                    self._error = CompressionError(f"corrupt zstd data ({e})")
                    return b"".join(out)
                piece = self._d.unused_data if self._d.eof else b""
        return b"".join(out)

    def readinto(self, b):
        while not self._buf and not self._done:
            chunk = self._f.read(1 << 20)
            if not chunk:
                if not self._d.eof:
                    self._error = CompressionError("truncated zstd stream (file ends inside a frame)")
                self._done = True
                break
            self._buf = self._feed(chunk)
            self._done = self._error is not None
        if not self._buf and self._error is not None:
            raise self._error
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self):
        self._f.close()
        super().close()


def count_newlines(path: str, end: int) -> int:
    """Newlines in bytes [0, end) of a plain file: the line number a byte-range piece starts after (a memchr
    scan at GB/s, against MB/s for the filters that follow)."""
    n = 0
    with open(path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 8 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            end -= len(chunk)
    return n


def open_binary(path: str):
    """Binary line-readable stream for plain, .gz and .zst files."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(path), buffer_size=1 << 20)
    return open(path, "rb")


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        return "hf_disk"
    low = path.lower()
    for ext, kind in ((JSONL_EXT, "jsonl"), (PARQUET_EXT, "parquet"), (TEXT_EXT, "text"), (HTML_EXT, "html")):
        if low.endswith(ext):
            return kind
    return ""


def _is_hf_disk(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, m)) for m in HF_DISK_MARKERS)


def _unreadable(p: str) -> str:
    """Why an input path cannot be opened: a symlink loop or a dangling symlink is told apart from a missing path."""
    try:
        os.stat(p)
        return ""
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{p} is a symlink loop (ELOOP: too many levels of symbolic links)"
        if os.path.islink(p):
            return f"{p} is a broken symlink (its target {os.readlink(p)} does not exist)"
        return f"no such file or folder: {p}"


def expand_paths(cfg: InputConfig) -> list[tuple[str, str, str]]:
    """Resolve ``input.paths`` into sorted units ``(format, path, id_prefix)``; raises ConfigError if a path is
    missing or nothing readable is found (before any output is written)."""
    files: list[str] = []
    for p in cfg.paths:
        if any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p, recursive=True))
            if not hits:
                raise ConfigError(f"input.paths: the glob {p!r} matches nothing")
            files.extend(h for h in hits if os.path.isfile(h) or _is_hf_disk(h) or os.path.islink(h))
        elif os.path.isdir(p):
            if _is_hf_disk(p):
                files.append(p)
                continue
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if _is_hf_disk(root):
                    files.append(root)
                    dirs[:] = []
                    continue
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ConfigError(f"input.paths: {_unreadable(p)}")
    units = []
    for f in sorted(set(os.path.normpath(f) for f in files)):
        kind = detect_format(f, cfg.format)
        if kind and _unreadable(f):  # found in a folder or by a glob: refused before anything is written
            raise ConfigError(f"input.paths: {_unreadable(f)}")
        if kind:
            units.append((kind, f))
    if cfg.hf_dataset:
        units.append(("hf_hub", cfg.hf_dataset))
    if not units:
        raise ConfigError(f"input.paths: no readable files (jsonl, parquet, txt/md/rst, html) under {cfg.paths}")
    local = [os.path.abspath(f) for k, f in units if k != "hf_hub"]
    base = os.path.commonpath([os.path.dirname(f) if os.path.isfile(f) else os.path.dirname(f.rstrip("/"))
                               for f in local]) if local else ""
    out = []
    for kind, f in units:
        rel = f"hf:{f}" if kind == "hf_hub" else os.path.relpath(os.path.abspath(f), base)
        out.append((kind, f, rel))
    return out


class Reader:
    """Reads one unit; counts skipped records in ``stats`` (Counter) under read_errors / empty. ``extra_keys``:
    fields read into ``meta`` besides ``metadata_keys`` (the URL when url_filter is on)."""

    def __init__(self, cfg: InputConfig, stats: Counter, extra_keys: tuple[str, ...] = ()):
        self.cfg, self.stats = cfg, stats
        self.meta_keys = list(dict.fromkeys([*cfg.metadata_keys, *extra_keys]))

    def _bad(self, where: str, msg: str):
        if self.cfg.on_error == "skip":
            self.stats["read_errors"] += 1
            return
        raise InputError(f"{where}: {msg}")

    def _make(self, doc_id: str, rec: dict, where: str):
        """Validate one record's text; return the document or None (skipped/empty)."""
        text = rec.get(self.cfg.text_key) if isinstance(rec, dict) else None
        if not isinstance(rec, dict):
            return self._bad(where, f"expected a JSON object, got {type(rec).__name__}")
        if self.cfg.text_key not in rec:
            return self._bad(where, f"missing text field {self.cfg.text_key!r} (input.text_key); "
                                    f"fields: {sorted(rec)[:10]}")
        if not isinstance(text, str):
            return self._bad(where, f"text field {self.cfg.text_key!r} is {type(text).__name__}, not a string")
        if len(text) > self.cfg.max_doc_chars:
            return self._bad(where, f"document of {len(text)} characters exceeds input.max_doc_chars="
                                    f"{self.cfg.max_doc_chars}")
        if not text.isascii():
            try:  # JSON may escape half of a surrogate pair ("\ud800"): not a character, and no encoder takes it
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return self._bad(where, f"text holds an unpaired surrogate (U+{ord(text[e.start]):04X}) at character "
                                        f"{e.start}: not valid Unicode")
        if len(text.strip()) < self.cfg.min_doc_chars:
            self.stats["empty"] += 1
            return None
        meta = {k: rec[k] for k in self.meta_keys if k in rec}
        if self.cfg.id_key and self.cfg.id_key in rec:
            meta["source_id"] = rec[self.cfg.id_key]
        return {"id": doc_id, "text": text, "meta": meta}

    def read(self, kind: str, path: str, rel: str, lo: int = 0, hi: int | None = None) -> Iterator[dict]:
        """Documents of one unit, or of one piece of it: bytes [lo, hi) of a plain jsonl file (the lines that
        start there) or row groups [lo, hi) of a parquet file (see task_plan.py). Ids never depend on the piece."""
        if kind in ("jsonl", "parquet"):
            return getattr(self, f"_read_{kind}")(path, rel, lo, hi)
        return getattr(self, f"_read_{kind}")(path, rel)

    def _read_jsonl(self, path, rel, lo=0, hi=None):
        limit = self.cfg.max_doc_chars * 4 + 4096  # utf-8 worst case plus JSON overhead
        lineno = 0
        try:
            with open_binary(path) as f:
                pos = 0
                if lo > 0:  # a byte range of a plain file: skip the line that began in the previous piece
                    lineno = count_newlines(path, lo - 1)
                    f.seek(lo - 1)
                    pos = lo - 1
                    while True:
                        part = f.readline(limit)
                        pos += len(part)
                        if not part or part.endswith(b"\n"):
                            lineno += bool(part)
                            break
                while hi is None or pos < hi:
                    line = f.readline(limit)
                    if not line:
                        break
                    pos += len(line)
                    lineno += 1
                    where = f"{path}:{lineno}"
                    if len(line) >= limit and not line.endswith(b"\n"):
                        while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
                            line = f.readline(limit)
                            pos += len(line)
                        self._bad(where, f"line longer than {limit} bytes (input.max_doc_chars={self.cfg.max_doc_chars})")
                        continue
                    if not line.strip():
                        continue
                    try:
                        s = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        self._bad(where, f"invalid UTF-8 at byte {e.start} of the line")
                        continue
                    try:
                        rec = json.loads(s)
                    except json.JSONDecodeError as e:
                        self._bad(where, f"broken JSON ({e.msg} at column {e.colno})")
                        continue
                    doc = self._make(f"{rel}:{lineno}", rec, where)
                    if doc:
                        yield doc
        except OSError as e:
            if e.errno is None:  # gzip's BadGzipFile and the like: damaged data, not a system error
                self._bad(f"{path}:{lineno + 1}", f"truncated or corrupt compressed file ({e})")
            elif e.errno == errno.ELOOP:
                self._bad(path, "a symlink loop (ELOOP: too many levels of symbolic links)")
            else:
                self._bad(f"{path}:{lineno + 1}" if lineno else path, f"cannot read the file ({e.strerror})")
        except (EOFError, zlib.error, CompressionError) as e:  # truncated / corrupt .gz or .zst
            # Documents before the damage were already yielded; the rest of the file is unreadable.
            self._bad(f"{path}:{lineno + 1}", f"truncated or corrupt compressed file ({e})")

    def _read_parquet(self, path, rel, lo=0, hi=None):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            return self._bad(path, f"not a readable parquet file ({e})")
        names = pf.schema_arrow.names
        if self.cfg.text_key not in names:
            if lo > 0:  # reported once, by the piece holding row group 0
                return None
            return self._bad(path, f"missing text column {self.cfg.text_key!r} (input.text_key); columns: {names}")
        cols = [c for c in dict.fromkeys([self.cfg.text_key, *self.meta_keys, self.cfg.id_key]) if c in names]
        groups = range(lo, pf.num_row_groups if hi is None else min(hi, pf.num_row_groups))
        row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))  # row ids count from the file's start
        if not groups:
            return None
        for batch in pf.iter_batches(batch_size=1024, columns=cols, row_groups=list(groups)):
            for rec in batch.to_pylist():
                doc = self._make(f"{rel}:{row}", rec, f"{path}:row {row}")
                row += 1
                if doc:
                    yield doc

    def _iter_hf(self, ds, path, rel):
        for row, rec in enumerate(ds):
            doc = self._make(f"{rel}:{row}", rec, f"{path}:row {row}")
            if doc:
                yield doc

    def _read_hf_disk(self, path, rel):
        import datasets
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[self.cfg.hf_split]
        return self._iter_hf(ds, path, rel)

    def _read_hf_json(self, path, rel):
        import datasets
        return self._iter_hf(datasets.load_dataset("json", data_files=[path], split="train", streaming=True), path, rel)

    def _read_hf_parquet(self, path, rel):
        import datasets
        return self._iter_hf(datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True),
                             path, rel)

    def _read_hf_hub(self, name, rel):
        """The Hub path (needs network; tests exercise the same iteration on local files)."""
        import datasets
        ds = datasets.load_dataset(name, self.cfg.hf_config or None, split=self.cfg.hf_split,
                                   streaming=self.cfg.hf_streaming)
        return self._iter_hf(ds, name, rel)

    def _read_file_bytes(self, path):
        with open(path, "rb") as f:
            data = f.read(self.cfg.max_doc_chars * 4 + 1)
        if len(data) > self.cfg.max_doc_chars * 4:
            self._bad(path, f"file larger than input.max_doc_chars={self.cfg.max_doc_chars} allows")
            return None
        return data

    def _read_text(self, path, rel):
        data = self._read_file_bytes(path)
        if data is None:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return self._bad(f"{path}:{line}", f"invalid UTF-8 at byte {e.start}")
        doc = self._make(rel, {self.cfg.text_key: text}, path)
        if doc:
            yield doc

    def _read_html(self, path, rel):
        try:
            import trafilatura
        except ImportError as e:  # lxml >= 5.2 split its cleaner out; trafilatura's justext needs it
            raise InputError(f"{path}: reading HTML needs trafilatura ({e}); pip install lxml_html_clean") from None
        data = self._read_file_bytes(path)
        if data is None:
            return
        text = trafilatura.extract(data, include_comments=False, include_tables=True, deduplicate=False) or ""
        doc = self._make(rel, {self.cfg.text_key: text}, path)
        if doc:
            yield doc
