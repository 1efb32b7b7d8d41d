"""SFT data as the trainer reads it. A ``data.paths`` entry written by the pipeline in SFT mode
(``configs/data/sft.yaml``) holds ``shards/`` (one conversation per document), ``loss_mask/`` (uint8, same
lengths) and ``chat_template.json`` (``data_pipeline/sft.py``).

**No packing**: sample k is one conversation, cut to ``data.seq_len + 1`` tokens on the right or padded after its
end. Why: the model's attention is plain causal SDPA in every layout (TP, PP stages and the KV-cache decoder all
rely on it); one conversation per row is exact with causal attention (padding comes after the conversation, so a
scored token never attends to it) and costs only the pad compute on short rows. The order of conversations is
``llmforge.data.streams.BlendedStream``'s (seeded per epoch permutation, blending by weight, sample k a pure function of
(seed, data config, k)), so resume and DP-size changes keep their guarantees. Non-target tokens are stored as
``-1 - id`` in the same int64 window, so streams and validation helpers stay unchanged; ``llmforge.core.loss``'s
``split_batch`` and ``MaskedLoss`` read them."""
from __future__ import annotations

import json
import os

import numpy as np

from llmforge.common.chat import MASK_DIR, TEMPLATE_FILE
from llmforge.common.shards import IndexedShard
from llmforge.core.config import ConfigError
from llmforge.data.streams import BlendedStream, _shard_prefixes, build_datasets


def is_sft_data(paths: list[str]) -> bool:
    """True when ``data.paths`` are SFT pipeline outputs (hold loss_mask/); mixing both kinds is refused."""
    flags = [os.path.isdir(os.path.join(p, MASK_DIR)) for p in paths]
    if any(flags) and not all(flags):
        sft = [p for p, f in zip(paths, flags) if f]
        raise ConfigError(f"data.paths mixes SFT data ({', '.join(sft)}: loss_mask/) with pretraining data; "
                          "fine-tune on SFT outputs only")
    return bool(flags) and all(flags)


class SFTDocs:
    """Conversations ``first..last`` of some shards, one per sample: ``window(i)`` -> (seq_len + 1,) int64 with
    non-target tokens stored as ``-1 - id`` (llmforge.data.streams.TokenWindows' interface)."""

    def __init__(self, prefixes: list[str], seq_len: int, pad_id: int, first: int = 0, last: int | None = None):
        self.tokens = [IndexedShard(p) for p in prefixes]
        self.masks = []
        for p, shard in zip(prefixes, self.tokens):
            mp = os.path.join(os.path.dirname(os.path.dirname(p)), MASK_DIR, os.path.basename(p))
            mask = IndexedShard(mp)
            if not np.array_equal(mask.lengths, shard.lengths):
                raise ValueError(f"{mp}: loss mask lengths do not match {p} (rerun the data pipeline)")
            self.masks.append(mask)
        self.seq_len, self.pad = seq_len, -1 - max(pad_id, 0)
        self.starts = np.cumsum([0] + [len(s) for s in self.tokens])
        self.total = int(self.starts[-1])
        self.first, self.last = first, self.total if last is None else last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def scored_tokens(self) -> int:
        """Loss targets over all samples (response tokens within seq_len + 1, the first token never a target)."""
        return sum(int((self.window(i)[1:] >= 0).sum()) for i in range(len(self)))

    def window(self, i: int) -> np.ndarray:
        k = self.first + i
        s = int(np.searchsorted(self.starts, k, side="right")) - 1
        j = k - int(self.starts[s])
        n = self.seq_len + 1
        ids = self.tokens[s].doc(j)[:n].astype(np.int64)
        mask = self.masks[s].doc(j)[:n].astype(bool)
        out = np.full(n, self.pad, dtype=np.int64)
        out[:len(ids)] = np.where(mask, ids, -1 - ids)
        return out


def build_sft_datasets(data_cfg, seed: int):
    """(train BlendedStream over conversations, [validation SFTDocs]) for SFT ``data.paths``. A path without
    valid-* shards holds out its last ``data.valid_fraction`` of conversations (at least one)."""
    train, valid, counts = [], [], []
    for p in data_cfg.paths:
        prefixes = _shard_prefixes(p, "train")
        if not prefixes:
            raise FileNotFoundError(f"data.paths: no .bin/.idx shards found at {p}")
        tpath = os.path.join(p, TEMPLATE_FILE)
        template = json.load(open(tpath)) if os.path.isfile(tpath) else {}
        pad = int(template.get("pad_id", 0))
        docs = SFTDocs(prefixes, data_cfg.seq_len, pad)
        vprefixes = _shard_prefixes(p, "valid")
        if vprefixes:
            train.append(docs)
            valid.append(SFTDocs(vprefixes, data_cfg.seq_len, pad))
        else:
            n_valid = max(1, int(docs.total * data_cfg.valid_fraction)) if data_cfg.valid_fraction > 0 else 0
            if n_valid >= docs.total:
                raise ValueError(f"data.paths: {p} has {docs.total} conversations, too few to hold out "
                                 f"{n_valid} for validation (set data.valid_fraction=0)")
            train.append(SFTDocs(prefixes, data_cfg.seq_len, pad, 0, docs.total - n_valid))
            if n_valid:
                valid.append(SFTDocs(prefixes, data_cfg.seq_len, pad, docs.total - n_valid))
        counts.append(float(len(train[-1])))
    weights = data_cfg.weights or counts
    return BlendedStream(train, weights, seed), [v for v in valid if len(v) > 0]


def build_any_datasets(data_cfg, seed: int):
    """SFT outputs (with loss_mask/) as conversations, anything else as pretraining windows."""
    if is_sft_data(data_cfg.paths):
        return build_sft_datasets(data_cfg, seed)
    return build_datasets(data_cfg, seed)
