"""SFT data as the trainer reads it. A ``data.paths`` entry written by the pipeline in SFT mode
(``configs/data/sft.yaml``) holds ``shards/`` (one conversation per document), ``loss_mask/`` (uint8, same
lengths) and ``chat_template.json`` (``data_pipeline/sft.py``).

**Unpacked** (default): sample k is one conversation, cut to ``data.seq_len + 1`` tokens on the right or padded
after its end; plain causal attention is exact (padding comes after the conversation, so a scored token never
attends to it) and costs the pad compute on short rows. **Packed** (``sft.pack: true``): the packs are computed
once from the conversation lengths (the ``.idx``, no token read), greedily in stored order: consecutive
conversations while they fit in ``seq_len + 1`` tokens, one longer than that alone and cut as unpacked; padding
only after a pack's last conversation. Each conversation's first token is marked as a document start
(llmforge/core/packing.py) and stored as a non-target, so the engines pass positions: a conversation attends only
within itself, its positions restart at 0, and every scored token gets the logits and loss it gets alone in a row
(tests/sft/test_sft_pack.py). Either way the samples (conversations or packs) are the windows that
``llmforge.data.streams.BlendedStream`` orders (seeded per epoch permutation, blending by weight, sample k a pure
function of (seed, data config, sft.pack, k)), so resume and DP-size changes keep their guarantees; validation is
packed the same way. Non-target tokens are stored as ``-1 - id`` in the same int64 window, so streams and
validation helpers stay unchanged; ``llmforge.core.loss``'s ``split_batch`` and ``MaskedLoss`` read them."""
from __future__ import annotations

import json
import os

import numpy as np

from llmforge.common.chat import MASK_DIR, TEMPLATE_FILE
from llmforge.common.shards import IndexedShard
from llmforge.core.config import ConfigError
from llmforge.core.packing import DOC_START
from llmforge.data.streams import BlendedStream, _shard_prefixes, build_datasets


def is_sft_data(paths: list[str]) -> bool:
    """True when ``data.paths`` are SFT pipeline outputs (hold loss_mask/); mixing both kinds is refused."""
    flags = [os.path.isdir(os.path.join(p, MASK_DIR)) for p in paths]
    if any(flags) and not all(flags):
        sft = [p for p, f in zip(paths, flags) if f]
        raise ConfigError(f"data.paths mixes SFT data ({', '.join(sft)}: loss_mask/) with pretraining data; "
                          "fine-tune on SFT outputs only")
    return bool(flags) and all(flags)


def greedy_packs(lengths: np.ndarray, n: int) -> np.ndarray:
    """Index of each pack's first conversation, then ``len(lengths)``: consecutive conversations while their
    lengths (each cut to n) sum to at most n, so one longer than n is alone in its pack."""
    firsts, used = [0], 0
    for k, length in enumerate(np.minimum(lengths, n).tolist()):
        if used and used + length > n:
            firsts.append(k)
            used = 0
        used += length
    return np.asarray((firsts if len(lengths) else []) + [len(lengths)], dtype=np.int64)


class SFTDocs:
    """Conversations ``first..last`` of some shards, one per sample or packed (``pack``): ``window(i)`` ->
    (seq_len + 1,) int64 with non-target tokens stored as ``-1 - id`` (llmforge.data.streams.TokenWindows'
    interface); packed, each conversation's first token carries DOC_START."""

    def __init__(self, prefixes: list[str], seq_len: int, pad_id: int, first: int = 0, last: int | None = None,
                 pack: bool = False):
        self.tokens = [IndexedShard(p) for p in prefixes]
        self.masks = []
        for p, shard in zip(prefixes, self.tokens):
            mp = os.path.join(os.path.dirname(os.path.dirname(p)), MASK_DIR, os.path.basename(p))
            mask = IndexedShard(mp)
            if not np.array_equal(mask.lengths, shard.lengths):
                raise ValueError(f"{mp}: loss mask lengths do not match {p} (rerun the data pipeline)")
            self.masks.append(mask)
        self.seq_len, self.pad, self.pack = seq_len, -1 - max(pad_id, 0), pack
        self.starts = np.cumsum([0] + [len(s) for s in self.tokens])
        self.total = int(self.starts[-1])
        self.first, self.last = first, self.total if last is None else last
        lengths = [np.asarray(s.lengths, dtype=np.int64) for s in self.tokens]
        self.lengths = np.concatenate(lengths)[self.first:self.last] if lengths else np.zeros(0, np.int64)
        n = seq_len + 1
        self.packs = greedy_packs(self.lengths, n) if pack else np.arange(len(self.lengths) + 1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.packs) - 1

    def conversations(self) -> int:
        return len(self.lengths)

    def padding(self) -> tuple[int, int]:
        """(pad tokens over these samples, pad tokens one conversation per sample would need): from the lengths."""
        n = self.seq_len + 1
        used = int(np.minimum(self.lengths, n).sum())
        return len(self) * n - used, self.conversations() * n - used

    def scored_tokens(self) -> int:
        """Loss targets over all samples (response tokens within seq_len + 1, the first token never a target)."""
        return sum(int((self.window(i)[1:] >= 0).sum()) for i in range(len(self)))

    def conversation(self, c: int, n: int) -> np.ndarray:
        """Conversation c (of this range) cut to n tokens, non-targets as ``-1 - id``; packed, its first token is
        marked as a document start and never a target (as the first token of a row is not)."""
        k = self.first + c
        s = int(np.searchsorted(self.starts, k, side="right")) - 1
        j = k - int(self.starts[s])
        ids = self.tokens[s].doc(j)[:n].astype(np.int64)
        mask = self.masks[s].doc(j)[:n].astype(bool)
        if self.pack and len(ids):
            ids[0] += DOC_START
            mask[0] = False
        return np.where(mask, ids, -1 - ids)

    def window(self, i: int) -> np.ndarray:
        n = self.seq_len + 1
        out = np.full(n, self.pad, dtype=np.int64)
        used = 0
        for c in range(int(self.packs[i]), int(self.packs[i + 1])):
            conv = self.conversation(c, n - used)
            out[used:used + len(conv)] = conv
            used += len(conv)
        return out


def pack_summary(stream) -> str:
    """The start line of a packed run: how many training samples the conversations fill, and the padding."""
    docs = stream.datasets
    convs, samples = sum(d.conversations() for d in docs), sum(len(d) for d in docs)
    pad, unpacked = (sum(d.padding()[i] for d in docs) for i in (0, 1))
    n = docs[0].seq_len + 1
    return (f"sft.pack: {convs} conversations in {samples} samples of {n} tokens, "
            f"{100 * pad / max(samples * n, 1):.1f}% padding (unpacked: {100 * unpacked / max(convs * n, 1):.1f}%)")


def build_sft_datasets(data_cfg, seed: int, pack: bool = False):
    """(train BlendedStream over conversations or packs of them, [validation SFTDocs]) for SFT ``data.paths``. A
    path without valid-* shards holds out its last ``data.valid_fraction`` of conversations (at least one)."""
    train, valid, counts = [], [], []
    for p in data_cfg.paths:
        prefixes = _shard_prefixes(p, "train")
        if not prefixes:
            raise FileNotFoundError(f"data.paths: no .bin/.idx shards found at {p}")
        tpath = os.path.join(p, TEMPLATE_FILE)
        template = json.load(open(tpath)) if os.path.isfile(tpath) else {}
        pad = int(template.get("pad_id", 0))
        docs = SFTDocs(prefixes, data_cfg.seq_len, pad, pack=pack)
        vprefixes = _shard_prefixes(p, "valid")
        if vprefixes:
            train.append(docs)
            valid.append(SFTDocs(vprefixes, data_cfg.seq_len, pad, pack=pack))
        else:
            n_valid = max(1, int(docs.total * data_cfg.valid_fraction)) if data_cfg.valid_fraction > 0 else 0
            if n_valid >= docs.total:
                raise ValueError(f"data.paths: {p} has {docs.total} conversations, too few to hold out "
                                 f"{n_valid} for validation (set data.valid_fraction=0)")
            train.append(SFTDocs(prefixes, data_cfg.seq_len, pad, 0, docs.total - n_valid, pack))
            if n_valid:
                valid.append(SFTDocs(prefixes, data_cfg.seq_len, pad, docs.total - n_valid, pack=pack))
        counts.append(float(len(train[-1])))
    weights = data_cfg.weights or counts
    return BlendedStream(train, weights, seed), [v for v in valid if len(v) > 0]


def build_any_datasets(data_cfg, seed: int, pack: bool = False):
    """SFT outputs (with loss_mask/) as conversations (packed with ``pack``: sft.pack), anything else as
    pretraining windows."""
    if is_sft_data(data_cfg.paths):
        return build_sft_datasets(data_cfg, seed, pack)
    return build_datasets(data_cfg, seed)
