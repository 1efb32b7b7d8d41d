"""``data.backend: megatron``: the training stream built by megatron-core's BlendedMegatronDatasetBuilder.

Same interface as :class:`llmforge.data.streams.BlendedStream` (``batch(start, count)`` → (count, seq_len + 1) int64
tokens) over the same ``.bin/.idx`` shards, but the sample order is Megatron's: GPTDataset's document/sample/
shuffle indices (seeded by ``seed``) blended by BlendedDataset. Sample k is a pure function of
(seed, data config, total samples = train.steps * global_batch_size, k), so resume, DP-size change and reshard
keep the guarantees of the native stream; unlike the native stream, changing ``train.steps`` changes Megatron's
order (its indices are sized by the number of samples, as in Megatron-LM).

The index cache is built by each process into its own temporary directory (no cross-process race, nothing
written next to the shards); the IndexedDataset/GPTDataset objects stay referenced by the stream, because
megatron-core closes its memory maps when they are collected.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings

import numpy as np
import torch

from llmforge.data.streams import _shard_prefixes


class _IdTokenizer:
    """The little megatron-core needs from a tokenizer to index pre-tokenized shards."""

    def __init__(self, vocab_size: int | None, eod: int = 0):
        self.vocab_size, self.eod, self.unique_identifiers = vocab_size, eod, {"class": "llmforge-ids"}

    def tokenize(self, text):  # pragma: no cover - never called for pre-tokenized data
        raise NotImplementedError


def _import_megatron():
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


@contextlib.contextmanager
def _rank0_without_group():
    """megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() unguarded when it builds its cache;
    before init_process_group (where the trainer builds its data) every process is its own rank 0."""
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _blend(prefix_lists: list[list[str]], weights: list[float] | None):
    """Megatron blend: one entry per shard prefix; a path's weight is split over its shards by tokens."""
    from llmforge.common.shards import IndexedShard
    prefixes, w = [], []
    for i, plist in enumerate(prefix_lists):
        tokens = [IndexedShard(p).num_tokens for p in plist]
        for p, t in zip(plist, tokens):
            prefixes.append(p)
            w.append(float(weights[i]) * t / sum(tokens) if weights else float(t))
    return prefixes, w


class MegatronStream:
    """Global sample index → (seq_len + 1) token window, read from a megatron-core dataset."""

    def __init__(self, dataset, keepalive):
        self.dataset, self._keepalive = dataset, keepalive  # keepalive: temp cache dir and low-level datasets

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self.dataset):
            raise IndexError(f"sample {k} is outside the megatron dataset ({len(self.dataset)} samples were built)")
        item = self.dataset[k]
        return torch.cat([item["tokens"][:1], item["labels"]]).numpy()

    def window(self, i: int) -> np.ndarray:  # validation interface of llmforge.data.streams.TokenWindows
        return self.sample(i)

    def batch(self, start: int, count: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.sample(k) for k in range(start, start + count)]).astype(np.int64))


def build_megatron_datasets(data_cfg, seed: int, num_samples: int, valid_samples: int = 256,
                            vocab_size: int | None = None):
    """(train MegatronStream, [valid MegatronStream] or []) for ``data.paths`` via BlendedMegatronDatasetBuilder."""
    if not data_cfg.paths:
        raise ValueError("data.paths is empty: give pipeline output dirs or shard prefixes")
    Builder, GPTDataset, GPTDatasetConfig = _import_megatron()
    train_lists, valid_lists = [], []
    for p in data_cfg.paths:
        tp = _shard_prefixes(p, "train")
        if not tp:
            raise FileNotFoundError(f"data.paths: no .bin/.idx shards found at {p}")
        train_lists.append(tp)
        valid_lists.append(_shard_prefixes(p, "valid"))
    cache = tempfile.TemporaryDirectory(prefix="llmforge-megatron-idx-")
    common = dict(random_seed=seed, sequence_length=data_cfg.seq_len, tokenizer=_IdTokenizer(vocab_size),
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False, path_to_cache=cache.name, mmap_bin_files=True)
    weights = data_cfg.weights
    if all(valid_lists):  # the pipeline wrote valid-* shards: use them as Megatron's validation split
        train_blend = _blend(train_lists, weights)
        valid_blend = _blend(valid_lists, None)
        config = GPTDatasetConfig(blend_per_split=[train_blend, valid_blend, None], **common)
    else:  # hold out a document fraction, Megatron-style
        vf = data_cfg.valid_fraction
        config = GPTDatasetConfig(blend=_blend(train_lists, weights),
                                  split=f"{100 * (1 - vf):.6f},{100 * vf:.6f},0", **common)
    sizes = [num_samples, valid_samples, None]
    with warnings.catch_warnings(), _rank0_without_group():
        warnings.simplefilter("ignore")
        train_ds, valid_ds, _ = Builder(GPTDataset, sizes, lambda: True, config).build()
    if train_ds is None or len(train_ds) < num_samples:
        raise ValueError(f"megatron data backend: built {0 if train_ds is None else len(train_ds)} training samples, "
                         f"need {num_samples}")
    train = MegatronStream(train_ds, cache)
    valid = [MegatronStream(valid_ds, cache)] if valid_ds is not None and len(valid_ds) else []
    return train, valid


def build_run_datasets(cfg, vocab_size: int | None = None):
    """(train stream, validation list) for a RunConfig, dispatching on ``data.backend`` (native | megatron).
    First the data is checked against itself and the model (one tokenizer, no id >= vocab_size): callers run this
    before any collective, so a bad blend fails in one line on every rank alike."""
    from llmforge.data.checks import check_data
    check_data(cfg.data, vocab_size or cfg.model.vocab_size)
    if cfg.data.backend == "megatron":
        return build_megatron_datasets(cfg.data, cfg.seed, cfg.train.steps * cfg.train.global_batch_size,
                                       vocab_size=vocab_size)
    from llmforge.data.sft import build_any_datasets as build_datasets
    return build_datasets(cfg.data, cfg.seed, cfg.sft.pack)
