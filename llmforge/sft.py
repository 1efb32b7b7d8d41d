"""Supervised fine-tuning on the trainer side: conversation samples with a loss mask, the masked loss with a
layout-independent normalisation, ``train.init_from`` and ``train.freeze``.

Data. A ``data.paths`` entry written by the pipeline in SFT mode (``configs/data/sft.yaml``) holds ``shards/``
(one conversation per document), ``loss_mask/`` (uint8, same lengths) and ``chat_template.json``
(``data_pipeline/sft.py``). **No packing**: sample k is one conversation, cut to ``data.seq_len + 1`` tokens on
the right or padded after its end. Why: the model's attention is plain causal SDPA in every layout (TP, PP
stages and the KV-cache decoder all rely on it); packing would need a document mask threaded through every
block, stage and schedule, while one conversation per row is exact with causal attention (padding comes after
the conversation, so it is never attended to by a scored token) and costs only the pad compute on short rows.
The order of conversations is ``llmforge.data.BlendedStream``'s (seeded per epoch permutation, blending by
weight, sample k a pure function of (seed, data config, k)), so resume and DP-size changes keep their guarantees.

Batches stay one int64 tensor ``(B, seq_len + 1)`` so every stream, device copy and validation helper works
unchanged: a token that is *not* a loss target is stored as ``-1 - id`` (pad too). ``split_batch`` turns that into
model inputs (ids) and targets (``IGNORE`` where masked); on a pretraining batch it is the plain shift.

Loss. ``MaskedLoss`` sums token cross-entropy over response tokens and divides by the number of response tokens
in the **global** batch, counted from the data (an integer all-reduce over the data-parallel group), times the
number of micro batches whose gradients the engine averages. Every layout (DDP, ZeRO-1/2/3, TP, PP, gradient
accumulation) then computes exactly sum(CE over all response tokens of the step) / their count, instead of a mean
of per-micro-batch means that would weigh a token by how many others share its micro batch.

``train.init_from``: an llmforge run dir (its newest complete checkpoint, any layout: DCP reshards by name, read
here without collectives) or a Hugging Face folder (``llmforge.export_hf`` import). The model shape is taken
from the source and written back into ``model.*`` so the run's config.yaml rebuilds it.

``train.freeze``: ``embeddings`` (token and position embeddings), ``head`` (final norm and output projection),
``blocks:K`` (the first K transformer blocks), ``block:I`` (block I). With tied embeddings, ``embeddings`` and
``head`` share the one matrix. Frozen parameters get no gradient and no optimizer state and stay bit-identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from llmforge.common.chat import MASK_DIR, TEMPLATE_FILE
from llmforge.common.shards import IndexedShard
from llmforge.config import ConfigError

IGNORE = -100  # F.cross_entropy's default ignore_index
FREEZE_NAMES = re.compile(r"embeddings|head|blocks:\d+|block:\d+")


# ------------------------------------------------------------------------------------------------ data
def is_sft_data(paths: list[str]) -> bool:
    """True when ``data.paths`` are SFT pipeline outputs (hold loss_mask/); mixing both kinds is refused."""
    flags = [os.path.isdir(os.path.join(p, MASK_DIR)) for p in paths]
    if any(flags) and not all(flags):
        sft = [p for p, f in zip(paths, flags) if f]
        raise ConfigError(f"data.paths mixes SFT data ({', '.join(sft)}: loss_mask/) with pretraining data; "
                          "fine-tune on SFT outputs only")
    return bool(flags) and all(flags)


def check_run(cfg) -> None:
    """SFT data, train.init_from and train.freeze need the native engine (and SFT data the native backend)."""
    for key in ("init_from", "freeze"):
        if getattr(cfg.train, key) and cfg.engine != "native":
            raise ConfigError(f"train.{key} needs engine=native (engine={cfg.engine})")
    if cfg.data.paths and is_sft_data(cfg.data.paths):
        if cfg.engine != "native":
            raise ConfigError(f"engine={cfg.engine}: fine-tuning on SFT data (loss masks) needs engine=native")
        if cfg.data.backend != "native":
            raise ConfigError("data.backend=megatron cannot read SFT loss masks: use data.backend=native")


class SFTDocs:
    """Conversations ``first..last`` of some shards, one per sample: ``window(i)`` -> (seq_len + 1,) int64 with
    non-target tokens stored as ``-1 - id`` (llmforge.data.TokenWindows' interface)."""

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
    from llmforge.data import BlendedStream, _shard_prefixes
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


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a (B, L + 1) batch: ids shifted by one; masked tokens -> ids / IGNORE targets."""
    x, y = batch[:, :-1], batch[:, 1:]
    return torch.where(x >= 0, x, -1 - x), torch.where(y >= 0, y, torch.full_like(y, IGNORE))


def copy_chat_template(paths: list[str], run_dir: str) -> None:
    """Rank 0: the data's chat_template.json into the run dir (generate / export_hf use it)."""
    for p in paths:
        src = os.path.join(p, TEMPLATE_FILE)
        if os.path.isfile(src):
            tmp = os.path.join(run_dir, TEMPLATE_FILE + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(run_dir, TEMPLATE_FILE))
            return


def chat_prompt_ids(run_dir: str, prompt: str, system: str | None = None) -> list[int] | None:
    """Ids asking a fine-tuned run (``chat_template.json`` in its dir) to answer ``prompt``; None otherwise."""
    if not os.path.isfile(os.path.join(run_dir, TEMPLATE_FILE)):
        return None
    from llmforge.common.chat import ChatTemplate
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return ChatTemplate(os.path.join(run_dir, "tokenizer.model")).encode_prompt(msgs)


def hf_tokenizer(tok_path: str):
    """A transformers tokenizer giving sentencepiece's ids for ``tok_path`` (checked on export_hf.CHECK_TEXT), or
    None. AutoTokenizer's own conversion first; else vocab + merges extracted from the BPE model (transformers 5)."""
    import sentencepiece as spm

    from llmforge.export_hf import CHECK_TEXT
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    # BOS = EOS as in the export's config (training never sees BOS); nothing is added to an encoded text
    specials = dict(unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(sp.eos_id()),
                    eos_token=sp.id_to_piece(sp.eos_id()))
    candidates = []
    try:
        from transformers import LlamaTokenizer
        candidates.append(lambda: LlamaTokenizer(vocab_file=tok_path, legacy=False, add_bos_token=False, **specials))
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        def extracted():
            got = SentencePieceExtractor(tok_path).extract(BPE)
            vocab, merges = (got["vocab"], got["merges"]) if isinstance(got, dict) else got[:2]
            return LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, legacy=False,
                                  add_bos_token=False, **specials)
        candidates.append(extracted)
    except ImportError:
        return None
    for make in candidates:
        try:
            tok = make()
            if tok.encode(CHECK_TEXT, add_special_tokens=False) == sp.encode(CHECK_TEXT):
                return tok
        except Exception:  # noqa: BLE001 - conversion support varies across transformers versions
            continue
    return None


def write_hf_chat_template(out_dir: str, run_dir: str, tok_path: str) -> str:
    """Export: a tokenizer with the run's chat template (tokenizer_config.json / chat_template.jinja) whose
    ``apply_chat_template`` gives our ids (checked on a sample conversation). Returns a note for the CLI."""
    template = os.path.join(run_dir, TEMPLATE_FILE)
    if not os.path.isfile(template):
        return ""
    from llmforge.common.chat import JINJA, ChatTemplate
    ours = ChatTemplate(tok_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world, 12 3?"},
            {"role": "assistant", "content": "Hi.\n  Two  spaces"}, {"role": "user", "content": "ünïcödé"}]

    def same_ids(tok) -> bool:
        tok.chat_template = JINJA
        return (list(tok.apply_chat_template(msgs[:3], tokenize=True, return_dict=False)) == ours.encode(msgs[:3])[0]
                and list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
                == ours.encode_prompt(msgs))

    def candidates():
        if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):  # export_hf's own conversion first
            from transformers import AutoTokenizer
            yield AutoTokenizer.from_pretrained(out_dir)
        yield hf_tokenizer(tok_path)  # text after a special token without a dummy prefix, as the template needs

    tok = next((t for t in candidates() if t is not None and same_ids(t)), None)
    if tok is None:
        return "chat template not exported (no transformers tokenizer gives the template's ids)"
    tok.save_pretrained(out_dir)
    shutil.copyfile(template, os.path.join(out_dir, "llmforge_" + TEMPLATE_FILE))  # HF reads chat_template.json itself
    return "chat template in the tokenizer config"


# ------------------------------------------------------------------------------------------------ loss
class MaskedLoss:
    """loss(logits, targets) = sum of CE over non-IGNORE targets * scale, scale set once per step by
    ``prepare`` to (dp * micro batches per rank) / (response tokens in the global batch)."""

    def __init__(self):
        self.scale = 1.0

    def prepare(self, targets: torch.Tensor, dp_group, n_micro: int) -> int:
        """Count this step's response tokens over the data-parallel group (exact integers, one all-reduce)."""
        n = (targets != IGNORE).sum().to(torch.int64).reshape(1)
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(n, group=dp_group)
        dp = dist.get_world_size(dp_group) if dist.is_initialized() else 1
        total = int(n.item())
        self.scale = dp * n_micro / max(total, 1)
        return total

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from llmforge.loss import cross_entropy  # chunked fp32 CE, also on vocab shards (parallel.loss_parallel)
        return cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE) * self.scale


# ------------------------------------------------------------------------------------------------ init / freeze
def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "config.yaml"))


def resolve_init_from(cfg, tok_path: str | None):
    """ModelArgs of ``train.init_from`` (run dir or HF folder), written back into ``cfg.model``."""
    import dataclasses

    from llmforge.model.presets import OVERRIDABLE, model_args
    src = cfg.train.init_from
    if not os.path.isdir(src):
        raise ConfigError(f"train.init_from: no such folder: {src}")
    if cfg.train.init_from_hf:
        raise ConfigError("train.init_from and train.init_from_hf are both set: give one")
    if _is_hf_folder(src):
        from llmforge.export_hf import hf_model_args
        margs = hf_model_args(src)
    else:
        from llmforge.run_loading import RunLoadError, run_config
        try:
            src_cfg = run_config(src)
        except RunLoadError as e:
            raise ConfigError(f"train.init_from: {e} (nor a Hugging Face folder: no config.json)") from None
        tok = os.path.join(src, "tokenizer.model")
        vocab = None
        if os.path.isfile(tok):
            import sentencepiece as spm
            vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
            if tok_path and open(tok, "rb").read() != open(tok_path, "rb").read():
                print(f"warning: train.init_from: {tok} differs from the data's tokenizer {tok_path}; "
                      "token ids may not mean the same", flush=True)
        margs = model_args(src_cfg.model, vocab)
    if tok_path:
        import sentencepiece as spm
        data_vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
        if data_vocab > margs.vocab_size:
            raise ConfigError(f"train.init_from: the data's tokenizer has {data_vocab} ids, the model "
                              f"{margs.vocab_size}")
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(margs, k) for k in OVERRIDABLE})
    return margs


def load_init_weights(parts, src: str) -> str:
    """Copy ``train.init_from``'s weights into this rank's (parallelised) model parts; returns what was loaded.
    A run dir: its newest complete checkpoint through the checkpointer (DCP reshards by name: any layout to any
    layout). An HF folder: our names, full tensors on every rank, distributed into the local shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    if _is_hf_folder(src):
        from llmforge.export_hf import import_hf
        args, sd = import_hf(src)
        want = parts[0].args
        diff = [k for k in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                            "tie_embeddings") if getattr(args, k) != getattr(want, k)]
        if diff:
            raise ConfigError(f"train.init_from={src}: the folder's {', '.join(diff)} differ from the model")
        for part in parts:
            names = set(get_model_state_dict(part))
            set_model_state_dict(part, {k: v for k, v in sd.items() if k in names},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        return src
    from llmforge.checkpoint import Checkpointer, newest_complete
    root = os.path.join(src, "checkpoints")
    path = newest_complete(root, log=lambda m: None)
    if path is None:
        raise ConfigError(f"train.init_from: no complete checkpoint under {root}")
    Checkpointer(root, rank=dist.get_rank()).load(path, parts, [], load_optimizer=False, load_rng=False)
    return path


def freeze(model, names: list[str]) -> list[str]:
    """Set requires_grad=False on the named groups of the whole (possibly meta) model before parallelize (DDP,
    FSDP, TP and pipeline stages then keep the flag); returns the frozen parameter names."""
    n_layers = len(model.layers)
    prefixes = []
    for name in names:
        if not FREEZE_NAMES.fullmatch(name):
            raise ConfigError(f"train.freeze: unknown group {name!r} (embeddings, head, blocks:K, block:I)")
        if name == "embeddings":
            prefixes += ["tok_embeddings.", "pos_embeddings."]
        elif name == "head":
            prefixes += ["norm.", "output."]
        else:
            k = int(name.split(":")[1])
            if (k > n_layers) if name.startswith("blocks:") else (k >= n_layers):
                raise ConfigError(f"train.freeze: {name} but the model has {n_layers} blocks")
            prefixes += [f"layers.{i}." for i in (range(k) if name.startswith("blocks:") else [k])]
    frozen = []
    for pname, p in model.named_parameters(remove_duplicate=False):
        if pname.startswith(tuple(prefixes)):
            p.requires_grad_(False)
    for pname, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            frozen.append(pname)
    if frozen and len(frozen) == len(list(model.named_parameters(remove_duplicate=False))):
        raise ConfigError(f"train.freeze={names} freezes every parameter: nothing would train")
    return frozen
