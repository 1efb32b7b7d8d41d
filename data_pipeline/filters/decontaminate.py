"""Benchmark decontamination (the ``decontaminate`` step): training documents that share a word n-gram with an
evaluation document are removed (``mode: remove``) or have the shared word spans cut out (``mode: redact``).

This module owns the n-gram normalisation, the reading of the evaluation files (``decontaminate.paths``), the
n-gram index and the step. The facts follow datatrove 0.10's n-gram decontamination (pipeline/decont/n_grams.py,
utils/text.py ``simplify_text``): lowercase; digit runs (with one decimal part, e.g. ``3.14``) become ``0``;
datatrove's punctuation characters and the ASCII/C1 control characters (except tab and newline) become spaces;
whitespace splits words; combining marks are dropped after an NFD decomposition. An n-gram is its ``n`` words
joined by single spaces, hashed with xxh64 (datatrove's ``xxhash64``: the same 64-bit values). An evaluation
document with fewer than ``n`` words gives no n-gram and is ignored (datatrove does not fall back to its whole
text); stats.json counts such documents as ``short_docs``. Differences: datatrove's English word tokenizer is
spaCy's (on punctuation-free text it nearly always splits at whitespace), its default n is 12 (ours 13, as GPT-3),
and it keeps only label n-grams plus the ones overlapping prompt and label, where every n-gram of the row's
``text_keys`` fields counts here (stricter).

The index (built once per run by the stage ``decontaminate``, data_pipeline/pipeline.py) is two arrays: the
sorted uint64 hashes of every (n-gram, file) pair and a parallel uint32 array of file numbers: 12 bytes per
distinct n-gram of a file, memory-mapped by the prepare tasks and searched with ``np.searchsorted``.
"""
from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections import Counter

import numpy as np
import xxhash

from ..config import ConfigError

PUNCTUATION = ("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
               + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160))
                                   for x in range(a, b)))))  # control characters except tab and newline
_PUNCT_TO_SPACE = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_NUMBER = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")  # str patterns: \d is any Unicode decimal digit (\p{Nd})
_TOKEN = re.compile(r"(?:\d+(?:[.,،٫⎖⎗⎘]\d+)?|[^\s" + re.escape(PUNCTUATION) + r"])+")
EVAL_EXT = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson", ".parquet", ".txt", ".md",
            ".rst")
ENTRY_BYTES = 12  # one uint64 hash + one uint32 file number per (n-gram, file) pair
_INDEX: dict = {}


def _strip_marks(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (see the module docstring)."""
    text = _NUMBER.sub("0", text.lower()).translate(_PUNCT_TO_SPACE)
    if text.isascii():
        return text.split()
    out = [w if w.isascii() else _strip_marks(w) for w in text.split()]
    return [w for w in out if w] if "" in out else out


def word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The same words with their character spans in ``text`` (for redaction)."""
    out, spans = [], []
    for m in _TOKEN.finditer(text):
        w = _strip_marks(_NUMBER.sub("0", m.group().lower()))
        if w:
            out.append(w)
            spans.append(m.span())
    return out, spans


def ngram_hashes(ws: list[str], n: int) -> np.ndarray:
    """xxh64 of each n-gram (its words joined by single spaces, UTF-8), in document order. The words are joined
    and encoded once; each n-gram is hashed from a slice of that buffer (no string per n-gram)."""
    count = len(ws) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    joined = " ".join(ws)
    buf = joined.encode()
    sizes = [len(w) for w in ws] if len(buf) == len(joined) else [len(w.encode()) for w in ws]
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64) + 1) - 1  # byte offset just past each word
    starts = (ends - np.asarray(sizes, dtype=np.int64)).tolist()
    ends = ends.tolist()
    mv, h = memoryview(buf), xxhash.xxh64_intdigest
    return np.fromiter((h(mv[starts[i]:ends[i + n - 1]]) for i in range(count)), dtype=np.uint64, count=count)


# ---- evaluation files ------------------------------------------------------------------------------------------

def eval_files(paths: list[str]) -> list[str]:
    """The evaluation files of ``decontaminate.paths`` (folders: their jsonl / parquet / text files, sorted);
    a missing or unreadable path, or a folder without such files, is a one-line ConfigError naming it."""
    out = []
    for p in paths:
        key = f"decontaminate.paths: {p}"
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(EVAL_EXT)]
            if not found:
                raise ConfigError(f"{key}: a folder without evaluation files ({', '.join(EVAL_EXT)})")
            out += found
        elif os.path.isfile(p):
            if not p.lower().endswith(EVAL_EXT):
                raise ConfigError(f"{key}: not a jsonl, parquet or text file (by its extension)")
            out.append(p)
        else:
            raise ConfigError(f"{key}: no such file or folder")
    for f in out:
        if not os.access(f, os.R_OK):
            raise ConfigError(f"decontaminate.paths: {f}: cannot read it (permission denied)")
    return [os.path.normpath(f) for f in dict.fromkeys(out)]


def _row_text(row, keys, where: str) -> str | None:
    if not isinstance(row, dict):
        raise ConfigError(f"decontaminate.paths: {where}: a row is {type(row).__name__}, not an object")
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in vals):
            raise ConfigError(f"decontaminate.text_keys: {where}: field {k!r} is not text or a list of texts")
        parts += vals
    return "\n".join(parts) if parts else None


def _read_jsonl(path: str, keys) -> list[str]:
    from ..readers import InputError, open_binary
    texts = []
    try:
        with open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ConfigError(f"decontaminate.paths: {path}:{lineno}: broken JSON ({e})") from None
                t = _row_text(row, keys, f"{path}:{lineno}")
                if t is None:
                    raise ConfigError(f"decontaminate.text_keys: {path}:{lineno}: none of the fields "
                                      f"{', '.join(keys)}")
                texts.append(t)
    except (OSError, EOFError, InputError) as e:
        raise ConfigError(f"decontaminate.paths: {path}: cannot read it ({e})") from None
    return texts


def _read_parquet(path: str, keys) -> list[str]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ConfigError(f"decontaminate.paths: {path}: not a readable parquet file ({str(e)[:100]})") from None
    cols = [k for k in keys if k in table.column_names]
    if not cols:
        raise ConfigError(f"decontaminate.text_keys: {path}: none of the columns {', '.join(keys)}")
    rows = table.select(cols).to_pylist()
    texts = []
    for i, row in enumerate(rows):
        t = _row_text(row, cols, f"{path}:row {i}")
        if t is not None:
            texts.append(t)
    return texts


def read_eval_texts(path: str, keys) -> list[str]:
    """The evaluation documents of one file: a jsonl / parquet row's ``text_keys`` fields (list items one after
    another) joined by line breaks; a text file is one document."""
    low = path.lower()
    if low.endswith(".parquet"):
        return _read_parquet(path, keys)
    if low.endswith((".txt", ".md", ".rst")):
        try:
            with open(path, "rb") as f:
                return [f.read().decode("utf-8-sig")]
        except UnicodeDecodeError as e:
            raise ConfigError(f"decontaminate.paths: {path}: not a text file (invalid UTF-8 at byte {e.start})"
                              ) from None
        except OSError as e:
            raise ConfigError(f"decontaminate.paths: {path}: cannot read it ({e.strerror})") from None
    return _read_jsonl(path, keys)


# ---- the index -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _build(files: tuple[str, ...], _stamps: tuple, keys: tuple[str, ...], n: int):
    hashes, file_no, info = [], [], []
    for i, f in enumerate(files):
        seen, docs, short = set(), 0, 0
        for text in read_eval_texts(f, keys):
            ws = words(text)
            docs += 1
            if len(ws) < n:
                short += 1
                continue
            seen.update(ngram_hashes(ws, n).tolist())
        arr = np.fromiter(seen, dtype=np.uint64, count=len(seen))
        hashes.append(arr)
        file_no.append(np.full(len(arr), i, dtype=np.uint32))
        info.append({"path": f, "docs": docs, "short_docs": short, "ngrams": len(arr)})
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    fno = np.concatenate(file_no) if file_no else np.zeros(0, np.uint32)
    order = np.lexsort((fno, h))
    return h[order], fno[order], info


def build_index(cfg) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(sorted hashes, file numbers, per-file info) of ``cfg`` (the decontaminate section); cached per process,
    so the check before the run and the index stage of a forked worker read the files once (a changed file,
    by size, time or inode, is read again)."""
    files = tuple(eval_files(list(cfg.paths)))
    stamps = tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in map(os.stat, files))
    return _build(files, stamps, tuple(cfg.text_keys), cfg.ngram)


def check(cfg) -> None:
    """Before any stage: every evaluation file is found and readable (one-line ConfigError otherwise)."""
    if cfg.enabled:
        build_index(cfg)


def load_index(hashes_path: str, files_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The index the stage wrote, memory-mapped (cached per process while the files stay the same)."""
    key = tuple((p, st.st_ino, st.st_mtime_ns, st.st_size) for p, st in
                ((p, os.stat(p)) for p in (hashes_path, files_path)))
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = (np.load(hashes_path, mmap_mode="r"), np.load(files_path, mmap_mode="r"))
    return _INDEX[key]


class DecontaminateStep:
    """The step of one prepare task: ``counts`` (redact mode) and ``contaminated_by`` (documents per evaluation
    file number; a document sharing n-grams with two files counts for both) are this task's."""

    def __init__(self, hashes: np.ndarray, file_no: np.ndarray, n_files: int, mode: str):
        self.hashes, self.file_no, self.mode = hashes, file_no, mode
        self.contaminated_by = [0] * n_files
        if mode == "redact":
            self.counts = ("redacted_docs", "redacted_spans", "redacted_words")

    def _hits(self, ws: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(word positions of the n-grams of ``ws`` found in the index, their positions in the index)."""
        q = ngram_hashes(ws, n)
        if not len(q) or not len(self.hashes):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.hashes, q), len(self.hashes) - 1)
        hit = np.flatnonzero(self.hashes[pos] == q)
        return hit, pos[hit]

    def _count_files(self, q_pos) -> None:
        found = set()
        for p in q_pos.tolist():
            h = self.hashes[p]
            while p < len(self.hashes) and self.hashes[p] == h:
                found.add(int(self.file_no[p]))
                p += 1
        for f in found:
            self.contaminated_by[f] += 1

    def __call__(self, doc: dict, cfg, counts: Counter | None = None) -> str | None:
        ws = words(doc["text"])
        if len(ws) < cfg.ngram:
            return None
        hit, at = self._hits(ws, cfg.ngram)
        if not len(hit):
            return None
        self._count_files(at)
        if self.mode == "remove":
            return "decontaminate.contaminated"
        return self._redact(doc, cfg.ngram, counts)

    def _redact(self, doc: dict, n: int, counts: Counter) -> str | None:
        text = doc["text"]
        ws, spans = word_spans(text)
        hit, _ = self._hits(ws, n)
        if not len(hit):
            return None  # the two word splits disagree (never seen): keep the document as it is
        runs: list[list[int]] = []  # merged word ranges [first, last] of the shared n-grams
        for i in hit.tolist():
            if runs and i <= runs[-1][1] + 1:
                runs[-1][1] = max(runs[-1][1], i + n - 1)
            else:
                runs.append([i, i + n - 1])
        pieces, at = [], 0
        for a, b in runs:
            pieces.append(text[at:spans[a][0]])
            at = spans[b][1]
        pieces.append(text[at:])
        doc["text"] = "".join(pieces)
        counts["redacted_docs"] += 1
        counts["redacted_spans"] += len(runs)
        counts["redacted_words"] += sum(b - a + 1 for a, b in runs)
        return "decontaminate.redacted_empty" if not doc["text"].strip() else None


def decontaminate_step(doc: dict, cfg) -> str | None:
    """Stand-alone use (tests, bench): the index of ``cfg`` built in this process."""
    h, f, info = build_index(cfg)
    step = DecontaminateStep(h, f, len(info), cfg.mode)
    return step(doc, cfg, Counter())
