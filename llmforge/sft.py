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

``train.lora.rank``: LoRA adapters on the blocks' linears, everything else frozen (llmforge/lora.py); the
pretrained weights load by name and the adapters start at zero effect.
"""
from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from llmforge.common.chat import TEMPLATE_FILE
from llmforge.config import ConfigError
from llmforge.sft_data import SFTDocs, build_sft_datasets, is_sft_data  # noqa: F401  (re-exported)
from llmforge.common.atomic import copy_file

IGNORE = -100  # F.cross_entropy's default ignore_index
FREEZE_NAMES = re.compile(r"embeddings|head|blocks:\d+|block:\d+")


# ------------------------------------------------------------------------------------------------ data


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


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a (B, L + 1) batch: ids shifted by one; masked tokens -> ids / IGNORE targets."""
    x, y = batch[:, :-1], batch[:, 1:]
    return torch.where(x >= 0, x, -1 - x), torch.where(y >= 0, y, torch.full_like(y, IGNORE))


def copy_chat_template(paths: list[str], run_dir: str) -> None:
    """Rank 0: the data's chat_template.json into the run dir (generate / export_hf use it)."""
    for p in paths:
        src = os.path.join(p, TEMPLATE_FILE)
        if os.path.isfile(src):
            copy_file(src, os.path.join(run_dir, TEMPLATE_FILE))
            return


def chat_prompt_ids(run_dir: str, prompt: str, system: str | None = None) -> list[int] | None:
    """Ids asking a fine-tuned run (``chat_template.json`` in its dir) to answer ``prompt``; None otherwise."""
    if not os.path.isfile(os.path.join(run_dir, TEMPLATE_FILE)):
        return None
    from llmforge.common.chat import ChatTemplate
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return ChatTemplate(os.path.join(run_dir, "tokenizer.model")).encode_prompt(msgs)


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
def _engine_of(run_dir: str) -> str:
    import yaml
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return "native"
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("engine", "native")


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
        if src_cfg.train.lora.rank:  # its checkpoints hold unmerged adapters
            raise ConfigError(f"train.init_from={src}: that run trained LoRA adapters; start from its export "
                              f"(python -m llmforge.export_hf {src} OUT merges them), train.init_from=OUT")
        tok = os.path.join(src, "tokenizer.model")
        vocab = None
        if os.path.isfile(tok):
            import sentencepiece as spm
            vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
        margs = model_args(src_cfg.model, vocab)
    check_init_source(cfg, "train.init_from", src, margs, tok_path)
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(margs, k) for k in OVERRIDABLE})
    return margs


def check_init_source(cfg, key: str, src: str, margs, tok_path: str | None) -> None:
    """A start from ``src`` (``key`` = train.init_from / init_from_hf) that contradicts the run: an explicit
    model.family other than the source's (its shape wins over the preset, but a named family is a statement), a
    tokenizer other than the data's (llmforge.data_checks.check_init_tokenizer; train.allow_tokenizer_change
    permits it), or a data vocabulary larger than the model's. The shards' largest id is checked against
    margs.vocab_size with the data (build_run_datasets)."""
    if cfg.model.family and cfg.model.family != margs.family:
        raise ConfigError(f"{key}={src} is a {margs.family} model but model.family={cfg.model.family}: drop "
                          f"model.family (the shape comes from {src}) or start from a {cfg.model.family} model")
    from llmforge.data_checks import check_init_tokenizer
    check_init_tokenizer(key, src, tok_path, cfg.train.allow_tokenizer_change)
    if tok_path:
        import sentencepiece as spm
        data_vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
        if data_vocab > margs.vocab_size:
            raise ConfigError(f"{key}={src}: the data's tokenizer {tok_path} has {data_vocab} ids, the model "
                              f"{margs.vocab_size}")


def load_init_weights(parts, src: str) -> str:
    """Copy ``train.init_from``'s weights into this rank's (parallelised) model parts; returns what was loaded.
    A run dir: its newest complete checkpoint through the checkpointer (DCP reshards by name: any layout to any
    layout). An HF folder: our names, full tensors on every rank, distributed into the local shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    if _is_hf_folder(src):
        from llmforge.export_hf import import_hf, shape_diff
        args, sd = import_hf(src)
        diff = shape_diff(parts[0].args, args)
        if diff:
            raise ConfigError(f"train.init_from={src} does not match the model ({'; '.join(diff)})")
        for part in parts:
            names = set(get_model_state_dict(part))
            set_model_state_dict(part, {k: v for k, v in sd.items() if k in names},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        return src
    if _engine_of(src) == "deepspeed":  # a DeepSpeed run: its shards consolidated by zero_to_fp32, then as above
        from llmforge.engines.deepspeed_weights import consolidated_state_dict
        sd, path, _ = consolidated_state_dict(os.path.join(src, "checkpoints"), parts[0].args.n_layers)
        for part in parts:
            names = set(get_model_state_dict(part))
            set_model_state_dict(part, {k: v for k, v in sd.items() if k in names},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        return path
    import sys
    from llmforge.checkpoint import Checkpointer, NoUsableCheckpoint, load_newest
    from llmforge.lora import is_adapter
    root = os.path.join(src, "checkpoints")
    ck = Checkpointer(root, rank=dist.get_rank())
    # the newest checkpoint that verifies (a damaged one is skipped with a warning naming the file, said once one
    # loads: a refusal is one line that names every damaged file)
    skipped: list[str] = []
    try:
        path, _ = load_newest(root, lambda p: ck.load(p, parts, [], load_optimizer=False, load_rng=False,
                                                      skip=is_adapter), log=skipped.append)
    except NoUsableCheckpoint as e:
        raise NoUsableCheckpoint(f"train.init_from: {e}") from None
    for line in skipped if dist.get_rank() == 0 else ():
        print(line, file=sys.stderr, flush=True)
    if path is None:
        raise ConfigError(f"train.init_from: no usable checkpoint under {root} (none, or all damaged or incomplete)")
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
