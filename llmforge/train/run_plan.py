"""Everything a run derives from its config before any process group exists, shared by both engines.

``plan_run`` checks the fine-tuning keys (SFT data, ``train.init_from``, ``train.freeze``), finds the tokenizer,
resolves the model shape (preset, overrides and data vocab; the HF folder of ``train.init_from_hf``; or the run or
HF folder of ``train.init_from``), checks the layout (the engine's own rules), derives the batch plan and opens
the data streams. The validated config is never changed: the plan carries the resolved copy (``config``, whose
``model`` section rebuilds the shape) that the run goes on with and records in config.yaml. ``resolve_shape_and_batch`` is the part
that needs no data, shared with the dry run. Every problem is a ConfigError raised identically on every rank,
before a collective could hang on it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from llmforge.core.config import ConfigError, RunConfig
from llmforge.data.streams import find_tokenizer
from llmforge.model.blocks import ModelArgs
from llmforge.model.presets import OVERRIDABLE, check_rope_scaling, model_args, rope_scaling_args


def vocab_from_tokenizer(path: str | None) -> int | None:
    if path is None:
        return None
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=path).vocab_size()


def batch_plan(cfg, dp: int, micro: int | None = None) -> tuple[int, int, int]:
    """(local batch per DP rank, micro batch, accumulation steps), checked against each other; ``micro`` is the
    engine's own choice where its layout fixes one (DeepSpeed's pipeline), else train.micro_batch_size."""
    t = cfg.train
    local = t.global_batch_size // dp
    micro = micro or t.micro_batch_size or local
    if local % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the per-rank batch {local} "
                          f"(global_batch_size {t.global_batch_size} / dp {dp})")
    accum = local // micro
    if t.grad_accum_steps and t.grad_accum_steps != accum:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} but global_batch_size / (micro_batch_size * dp)"
                          f" = {t.global_batch_size} / ({micro} * {dp}) = {accum}")
    return local, micro, accum


def eval_batch_count(cfg, micro: int) -> int:
    """train.eval_batches global batches, scored in micro batches: the same windows in any layout and engine."""
    return cfg.train.eval_batches * cfg.train.global_batch_size // micro


def resolve_model_args(cfg, tok_path: str | None) -> ModelArgs:
    """The model shape: from the source of train.init_from (run dir or HF folder) or train.init_from_hf when set,
    else preset + overrides + data vocab."""
    if cfg.train.init_from:  # fine-tuning: an llmforge run dir or an HF folder (llmforge/train/init_from.py)
        from llmforge.train.init_from import resolve_init_from
        return with_context_extension(cfg, resolve_init_from(cfg, tok_path))
    if not cfg.train.init_from_hf:
        return model_args(cfg.model, vocab_from_tokenizer(tok_path))
    from llmforge.hf import hf_model_args
    from llmforge.train.init_from import check_init_source
    margs = hf_model_args(cfg.train.init_from_hf)
    check_init_source(cfg, "train.init_from_hf", cfg.train.init_from_hf, margs, tok_path)  # family, tokenizer, vocab
    return with_context_extension(cfg, margs)


def with_context_extension(cfg, margs: ModelArgs) -> ModelArgs:
    """A start folder's shape with the run's context extension (continued pretraining at a longer context): a set
    ``model.rope_scaling.type`` and ``model.max_seq_len`` replace the source's (Llama family: neither sizes a
    weight). Unset, the source's are kept (a Hub Llama 3.1 brings its own llama3 scaling)."""
    if margs.family != "llama":
        if cfg.model.rope_scaling.type != "none":
            raise ConfigError(f"model.rope_scaling.type={cfg.model.rope_scaling.type} needs a Llama-family model; "
                              f"the start folder is {margs.family} (learned positions)")
        return margs
    changes = {"rope_scaling": rope_scaling_args(margs.rope_scaling, cfg.model.rope_scaling)}
    if cfg.model.max_seq_len:
        changes["max_seq_len"] = cfg.model.max_seq_len
    margs = dataclasses.replace(margs, **changes)
    try:
        check_rope_scaling(margs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return margs


def resolved_config(cfg: RunConfig, margs: ModelArgs) -> RunConfig:
    """The run's config as config.yaml records it: a new object (the validated one is never changed) whose
    ``model`` section rebuilds ``margs`` when the shape came from a start folder (init_from / init_from_hf)."""
    if not (cfg.train.init_from or cfg.train.init_from_hf):
        return cfg
    model = dataclasses.replace(cfg.model, **{k: getattr(margs, k) for k in OVERRIDABLE})
    if margs.rope_scaling.type != "none":  # the source's or the run's scaling, as a model section rebuilds it
        model = dataclasses.replace(model, rope_scaling=dataclasses.replace(cfg.model.rope_scaling,
                                                                            **dataclasses.asdict(margs.rope_scaling)))
    if margs.moe.num_experts:  # the source's experts (a dense source: check_init_moe refused an MoE config)
        model = dataclasses.replace(model, moe=dataclasses.replace(cfg.model.moe, **dataclasses.asdict(margs.moe)))
    return dataclasses.replace(cfg, model=model)


def with_expanded_paths(cfg: RunConfig) -> RunConfig:
    """A copy with ``~`` expanded in run_dir, data.paths and the start folders (`run_dir: ~/runs/x` in a YAML file:
    no shell expanded it)."""
    ex = os.path.expanduser
    train = dataclasses.replace(cfg.train, init_from=ex(cfg.train.init_from), init_from_hf=ex(cfg.train.init_from_hf))
    data = dataclasses.replace(cfg.data, paths=[ex(p) for p in cfg.data.paths])
    return dataclasses.replace(cfg, run_dir=ex(cfg.run_dir), train=train, data=data)


def resolve_shape_and_batch(cfg, world: int, resolve_layout: Callable, tok_path: str | None) -> tuple:
    """(model args, the engine's layout, dp, local batch, micro batch, accumulation steps): what a run resolves
    before it needs its data, shared by ``plan_run`` and the dry run (which may have no data)."""
    margs = resolve_model_args(cfg, tok_path)
    if cfg.data.seq_len > margs.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model max_seq_len={margs.max_seq_len} (set "
                          f"model.max_seq_len, with model.rope_scaling to extend a pretrained context; see "
                          f"configs/train/llama-8b-128k.yaml)")
    layout, dp, micro = resolve_layout(cfg, world, margs)
    return (margs, layout, dp, *batch_plan(cfg, dp, micro))


class SampleStream(Protocol):
    """The training data as the loop reads it: sample k of the run is a pure function of (seed, data config, k)
    (llmforge.data.streams.BlendedStream, llmforge.data.megatron's Megatron-backed stream)."""

    def sample(self, k: int) -> np.ndarray: ...

    def batch(self, start: int, count: int) -> torch.Tensor: ...


@dataclass
class RunPlan:
    config: RunConfig          # resolved (resolved_config): what the run goes on with and config.yaml records
    tok_path: str | None
    margs: ModelArgs
    layout: object             # the engine's resolved layout (ParallelDims for native, DeepSpeed's for deepspeed)
    dp: int                    # data-parallel size (ranks that read different samples)
    local_bs: int              # sequences per data-parallel rank per step
    micro: int                 # sequences per forward/backward
    accum: int                 # micro batches per step
    train_stream: SampleStream  # global sample index -> tokens
    valid: Sequence            # validation windows (may be empty)
    eval_batches: int          # validation micro batches per evaluation (same windows in any layout)


def plan_run(cfg, world: int, resolve_layout: Callable) -> RunPlan:
    """``resolve_layout(cfg, world, margs) -> (layout, dp, micro or None)`` is the engine's layout check (no
    collective). ``cfg`` is not changed: the plan's ``config`` is the resolved copy the run goes on with."""
    from llmforge.data.megatron import build_run_datasets
    from llmforge.train.init_from import check_run
    check_run(cfg)  # SFT data, train.init_from, train.freeze: native engine (and data backend)
    tok_path = find_tokenizer(cfg.data.paths)
    margs, layout, dp, local_bs, micro, accum = resolve_shape_and_batch(cfg, world, resolve_layout, tok_path)
    train_stream, valid = build_run_datasets(cfg, margs.vocab_size)  # data.backend: native | megatron
    return RunPlan(resolved_config(cfg, margs), tok_path, margs, layout, dp, local_bs, micro, accum, train_stream,
                   valid, eval_batch_count(cfg, micro))
