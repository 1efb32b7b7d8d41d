"""The full composition, in one order: (float8 →) PP split → EP → TP/SP → activation recomputation → compile →
FSDP2 or DDP.

What the engine gets back is a ``ParallelModel`` (parallel_model.py): the local model parts, the pipeline
schedule when pp > 1, and the typed hooks this layout needs (FSDP accumulation sync, gradient all-reduce for
TP/PP without DDP, ZeRO-1 optimizers, the pp loss group, clipping over shards, validation under PP).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from llmforge.core.distributed import resolve_dtype

from . import ParallelModel
from .data_parallel import GradAllReduce, apply_ddp, zero1_optimizers
from .fsdp import apply_fsdp, expert_fsdp_mesh, fsdp_mesh, make_set_sync
from .parallel_model import clip_grad_norm
from .recompute import apply_recompute
from .tensor_parallel import apply_tp, sequence_parallel_stage_io


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged; identical blocks share the compiled code)."""
    for block in model.layers.values():
        block.compile()


def parallelize_all(model: nn.Module, dims, mesh, cfg, device: torch.device, loss_fn=None,
                    materialize=None) -> ParallelModel:
    """``model`` is either materialised (moved to ``device``) or on the meta device (parallel/build.py): then
    ``materialize(parts)`` allocates and fills this rank's shards after FSDP, before DDP / ZeRO-1 / the
    schedule; with ``device`` = meta (the dry run) nothing is allocated and DDP is not wrapped."""
    p = cfg.parallel
    # LoRA / train.freeze were applied by the model build (llmforge/model/freeze.py); TP's SequenceParallel
    # re-registers norms as trainable, so the frozen names are restored after it
    frozen = {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}
    if cfg.train.float8:  # before the PP split, recompute, compile and FSDP (llmforge/parallel/float8.py)
        from .float8 import apply_float8
        apply_float8(model, cfg.train.float8_recipe, cfg.train.float8_emulate, p.zero_stage in (2, 3))
    on_meta = next(model.parameters()).is_meta
    pipelined = dims.pp > 1
    if pipelined:
        from . import pipeline
        pp_rank = mesh["pp"].get_local_rank()
        ids, parts = pipeline.split_model(model, dims, p.pp_schedule, pp_rank)
        n_stages = dims.pp * dims.pp_stages_per_rank
        firsts, lasts = [i == 0 for i in ids], [i == n_stages - 1 for i in ids]
    else:
        parts, firsts, lasts = [model], [True], [True]
    del model

    for part, first, last in zip(parts, firsts, lasts):
        if not on_meta:
            part.to(device)
        if dims.ep > 1:  # experts sharded over ep, tokens dispatched by all-to-all (expert_parallel.py)
            from .expert_parallel import apply_ep
            apply_ep(part, mesh["ep"])
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], p.sequence_parallel, p.loss_parallel)
            if pipelined and p.sequence_parallel:
                sequence_parallel_stage_io(part, mesh["tp"], first, last)
            for name, param in part.named_parameters():  # SequenceParallel re-registers norms as trainable
                if name in frozen:
                    param.requires_grad_(False)
        if dims.cp > 1:  # attention over the whole sequence's K/V (context_parallel.py)
            from .context_parallel import apply_cp
            apply_cp(part, mesh["cp"].get_group(), p.cp_comm)
        apply_recompute(part, cfg.recompute, cfg.recompute_every)
        if p.compile:
            apply_compile(part)

    pm = ParallelModel(parts)
    if dims.cp > 1:
        from .context_parallel import ContextSplit
        pm.context = ContextSplit(mesh["cp"].get_group())
    if p.zero_stage in (2, 3):
        dp_mesh = fsdp_mesh(mesh, dims)
        dtype = resolve_dtype(cfg.train.dtype, device)
        experts = expert_fsdp_mesh(mesh, dims) if dims.ep > 1 else None
        parts = [apply_fsdp(part, dp_mesh, p.zero_stage, pipelined, dtype, experts, dims.dp) for part in parts]
        pm.parts = parts
        pm.set_sync = make_set_sync(parts, p.zero_stage)
    if materialize is not None:
        materialize(pm.parts)
    if p.zero_stage in (0, 1) and dims.dp_replicate * dims.cp > 1:  # cp ranks hold replicas too
        group = mesh["dp_replicate_cp" if dims.cp > 1 else "dp_replicate"].get_group()
        if not pipelined and dims.tp == 1 and torch.device(device).type != "meta":
            pm.parts, pm.ddp = [apply_ddp(parts[0], group, device)], True
        else:
            pm.grad_sync = GradAllReduce(parts, group)
    if p.zero_stage == 1:
        pm.zero1_optimizers = zero1_optimizers(pm.parts, cfg.train,
                                               mesh["dp_replicate_cp" if dims.cp > 1 else "dp_replicate"].get_group())

    pp_group = mesh["pp"].get_group() if pipelined else None
    if pipelined or dims.tp > 1 or p.zero_stage in (2, 3):
        pm.clip_fn = lambda max_norm: clip_grad_norm(pm.parts, max_norm, pp_group)
    if pipelined:
        from . import pipeline
        pm.schedule = pipeline.build_schedule(pm.parts, ids, dims, p.pp_schedule, device, loss_fn, pp_group)
        pm.is_first, pm.is_last = any(firsts), any(lasts)
        pm.loss_group = pp_group
        pm.eval_fn = pipeline.make_evaluate(pm.parts, ids, dims, p.pp_schedule, pp_group, pm.context)
    return pm
