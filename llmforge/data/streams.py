"""Training data: the pipeline's .bin/.idx shards as one deterministic, resumable sample stream.

Sample k of a run is a pure function of (seed, data config, k):
- each dataset (one entry of ``data.paths``) is its shards' tokens back to back, cut into windows of
  ``seq_len + 1`` tokens with stride ``seq_len`` (inputs and shifted targets share the boundary token);
- blending gives dataset d its n-th sample at key (n + 0.5) / w_d; the global order sorts all keys (ties by
  dataset), so the first N samples never depend on N (changing ``train.steps`` does not reorder the run);
- within a dataset, epoch e visits windows in a permutation seeded by (seed, d, e).
Step s of a data-parallel rank reads global samples [start + s*G + r*G/dp, ...): any DP size, resume or
reshard continues the same global stream with nothing repeated or skipped.
With ``data.document_mask`` a window also marks where documents begin (the ``.idx`` document index;
llmforge/core/packing.py), so attention stops at document boundaries and positions restart.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import torch

from llmforge.common.shards import IndexedShard, find_tokenizer  # noqa: F401  (re-exported)
from llmforge.core.packing import mark_doc_starts


def _shard_prefixes(path: str, split: str) -> list[str]:
    """A pipeline output dir → its ``shards/{split}-*`` prefixes; otherwise a prefix or glob of prefixes."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "shards", f"{split}-*.idx")))
        if not found and split == "train":
            found = sorted(glob.glob(os.path.join(path, "shards", "*.idx")) or glob.glob(os.path.join(path, "*.idx")))
        return [f[:-4] for f in found]
    if split != "train":
        return []
    found = sorted(glob.glob(path if path.endswith(".idx") else path + ".idx")) or sorted(glob.glob(path + "*.idx"))
    return [f[:-4] for f in found]


class TokenWindows:
    """Fixed-length windows over the concatenated tokens of several shards."""

    def __init__(self, prefixes: list[str], seq_len: int, first_window: int = 0, last_window: int | None = None,
                 document_mask: bool = False):
        self.shards = [IndexedShard(p) for p in prefixes]
        self.document_mask = document_mask
        self._doc_starts: dict[int, np.ndarray] = {}
        self.seq_len = seq_len
        self.starts = np.cumsum([0] + [s.num_tokens for s in self.shards])
        total_windows = max(0, (int(self.starts[-1]) - 1) // seq_len)
        self.first = first_window
        self.last = total_windows if last_window is None else last_window
        self.vocab_max = None

    @property
    def total_windows(self) -> int:
        return max(0, (int(self.starts[-1]) - 1) // self.seq_len)

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def tokens(self, start: int, n: int) -> np.ndarray:
        out, pos = [], start
        while n > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[i])
            take = min(n, self.shards[i].num_tokens - local)
            out.append(np.asarray(self.shards[i].tokens[local:local + take], dtype=np.int64))
            pos, n = pos + take, n - take
        return np.concatenate(out) if len(out) > 1 else out[0]

    def window(self, i: int) -> np.ndarray:
        start = (self.first + i) * self.seq_len
        ids = self.tokens(start, self.seq_len + 1)
        return mark_doc_starts(ids, self.doc_starts_in(start, self.seq_len + 1)) if self.document_mask else ids

    def shard_doc_starts(self, i: int) -> np.ndarray:
        """Token offsets of shard i's documents (sorted; its byte offsets read in place when every document is
        one sequence, as the pipeline writes them)."""
        if i not in self._doc_starts:
            sh = self.shards[i]
            if len(sh.doc_idx) == len(sh.lengths) + 1:  # one sequence per document
                self._doc_starts[i] = sh.offsets
            else:
                self._doc_starts[i] = sh.offsets[sh.doc_idx[:-1]]
        return self._doc_starts[i]

    def doc_starts_in(self, start: int, n: int) -> np.ndarray:
        """Offsets within [start, start + n) of the global token stream where a document begins."""
        out, end = [], start + n
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while i < len(self.shards) and int(self.starts[i]) < end:
            base, item = int(self.starts[i]), self.shards[i].dtype.itemsize
            byte_starts = self.shard_doc_starts(i)
            lo = int(np.searchsorted(byte_starts, max(start - base, 0) * item))
            hi = int(np.searchsorted(byte_starts, (end - base) * item))
            out.append(np.asarray(byte_starts[lo:hi]) // item + base - start)
            i += 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def documents(self) -> int:
        return sum(len(s.doc_idx) - 1 for s in self.shards)


class BlendedStream:
    """Global sample index → (seq_len + 1) token window, blended over datasets by weight."""

    def __init__(self, datasets: list[TokenWindows], weights: list[float], seed: int):
        if any(len(d) == 0 for d in datasets):
            raise ValueError("a training dataset is shorter than one sequence (data.seq_len + 1 tokens)")
        w = np.asarray(weights, dtype=np.float64)
        self.datasets, self.weights, self.seed = datasets, w / w.sum(), seed
        self._order_n = 0
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _ensure_order(self, n: int) -> None:
        """Compute the (dataset, within-dataset index) of the first n global samples (grown geometrically)."""
        if n <= self._order_n:
            return
        n = max(n, 2 * self._order_n, 1024)
        keys, ds, idx = [], [], []
        for d, w in enumerate(self.weights):
            m = int(np.ceil(n * w)) + 2
            j = np.arange(m, dtype=np.int64)
            keys.append((j + 0.5) / w)
            ds.append(np.full(m, d, dtype=np.int64))
            idx.append(j)
        keys, ds, idx = np.concatenate(keys), np.concatenate(ds), np.concatenate(idx)
        order = np.lexsort((ds, keys))[:n]
        self._ds, self._idx, self._order_n = ds[order], idx[order], n

    def _window_index(self, d: int, n: int) -> int:
        size = len(self.datasets[d])
        epoch, pos = divmod(n, size)
        key = (d, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, d, epoch]).permutation(size)
        return int(self._perm_cache[key][pos])

    def sample(self, k: int) -> np.ndarray:
        self._ensure_order(k + 1)
        d, n = int(self._ds[k]), int(self._idx[k])
        return self.datasets[d].window(self._window_index(d, n))

    def batch(self, start: int, count: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.sample(k) for k in range(start, start + count)]))


def build_datasets(data_cfg, seed: int):
    """(train stream, list of validation TokenWindows) from ``data.paths``."""
    if not data_cfg.paths:
        raise ValueError("data.paths is empty: give pipeline output dirs or shard prefixes (data.paths=[outputs/sample])")
    train, valid, tokens = [], [], []
    for p in data_cfg.paths:
        prefixes = _shard_prefixes(p, "train")
        if not prefixes:
            raise FileNotFoundError(f"data.paths: no .bin/.idx shards found at {p}")
        vprefixes = _shard_prefixes(p, "valid")
        mask = data_cfg.document_mask
        tw = TokenWindows(prefixes, data_cfg.seq_len, document_mask=mask)
        if mask and tw.documents() <= len(tw.shards):
            raise ValueError(f"data.document_mask: {p} has no document boundaries (its .idx lists one document "
                             f"per shard): write one document per sequence, as the data pipeline does, or set "
                             f"data.document_mask=false")
        tokens.append(int(tw.starts[-1]))
        if vprefixes:
            train.append(tw)
            valid.append(TokenWindows(vprefixes, data_cfg.seq_len, document_mask=mask))
        else:  # hold out the tail of this dataset
            n_valid = int(tw.total_windows * data_cfg.valid_fraction) if data_cfg.valid_fraction > 0 else 0
            if data_cfg.valid_fraction > 0:
                n_valid = max(1, n_valid)
            cut = tw.total_windows - n_valid
            train.append(TokenWindows(prefixes, data_cfg.seq_len, 0, cut, mask))
            if n_valid:
                valid.append(TokenWindows(prefixes, data_cfg.seq_len, cut, tw.total_windows, mask))
    weights = data_cfg.weights or [float(t) for t in tokens]
    return BlendedStream(train, weights, seed), [v for v in valid if len(v) > 0]


def validation_batches(valid: list[TokenWindows], batch: int, max_batches: int):
    """Deterministic validation batches: windows in order, datasets one after another."""
    rows, produced = [], 0
    for ds in valid:
        for i in range(len(ds)):
            rows.append(ds.window(i))
            if len(rows) == batch:
                yield torch.from_numpy(np.stack(rows))
                rows, produced = [], produced + 1
                if max_batches and produced >= max_batches:
                    return
    if rows:
        yield torch.from_numpy(np.stack(rows))
