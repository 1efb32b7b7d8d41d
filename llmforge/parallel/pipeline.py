"""Pipeline parallelism with ``torch.distributed.pipelining`` (torchtitan's manual split).

The model is cut into ``pp x stages_per_rank`` stages by deep-copying it and deleting what a stage does not own
(layers, and tok/pos embeddings or norm/output set to None): parameter names stay those of the whole model, so
checkpoints move between layouts. The engines cut the meta-device model (parallel/build.py): a copy costs no
memory, and each rank materialises only its own stages' shards. Single-stage schedules (GPipe, 1F1B) give rank
r stage r; multi-stage ones give it stages r, r+pp (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) or
r, 2*pp-1-r (the "V" of ZBVZeroBubble and DualPipeV). With more stages than layers the embedding / output head
get stages of their own.

Microbatches: see ``llmforge.parallel.pipeline_microbatches``. The loss is the mean over equal microbatches of the
per-microbatch mean loss (= the full-batch mean), gradients are scaled by 1/microbatches by the schedule, so a
pipelined step equals an unpipelined one.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from llmforge.data.streams import validation_batches
from llmforge.core.loss import IGNORE_INDEX, cross_entropy, split_batch
from llmforge.core.packing import marked_positions
from llmforge.model.moe import moe_layers

V_SCHEDULES = ("zbvzerobubble", "dualpipev")


def stage_ids(schedule: str, pp: int, pp_rank: int, stages_per_rank: int) -> list[int]:
    if stages_per_rank == 1:
        return [pp_rank]
    if schedule.lower() in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_units(n_layers: int, n_stages: int) -> list[list[str]]:
    """Contiguous, as even as possible: layer ids per stage; "emb"/"out" appear only when stages > layers."""
    units = [str(i) for i in range(n_layers)]
    if n_stages > n_layers:
        units = ["emb"] + units + ["out"]
    base, extra = divmod(len(units), n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(units[start:start + size])
        start += size
    return out


def build_stage_module(model: nn.Module, units: list[str], first: bool, last: bool) -> nn.Module:
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if name not in units:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
        stage.pos_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


def split_model(model: nn.Module, dims, schedule: str, pp_rank: int) -> tuple[list[int], list[nn.Module]]:
    n_stages = dims.pp * dims.pp_stages_per_rank
    plan = split_units(len(model.layers), n_stages)
    ids = stage_ids(schedule, dims.pp, pp_rank, dims.pp_stages_per_rank)
    parts = [build_stage_module(model, plan[i], i == 0, i == n_stages - 1) for i in ids]
    return ids, parts


def build_schedule(parts, ids, dims, schedule: str, device, loss_fn, pp_group):
    n_stages = dims.pp * dims.pp_stages_per_rank
    stages = [PipelineStage(part, i, n_stages, device, group=pp_group) for part, i in zip(parts, ids)]
    cls = get_schedule_class(schedule)
    single = issubclass(cls, PipelineScheduleSingle)
    schedule = cls(stages[0] if single else stages, n_microbatches=dims.pp_microbatches, loss_fn=loss_fn,
                   scale_grads=True)
    _quiet_moe_stats_during_setup(schedule, parts)
    return schedule


def _quiet_moe_stats_during_setup(schedule, parts) -> None:
    """The first step of a schedule runs a forward and backward of each stage on placeholder inputs to learn
    the shapes (torch's ``_initialize_pp_stages``): the MoE blocks must not count those tokens as routed load."""
    setup = getattr(schedule, "_initialize_pp_stages", None)
    moes = [moe for part in parts for _, moe in moe_layers(part)]
    if setup is None or not moes:
        return

    def quiet_setup(*args, **kwargs):
        for moe in moes:
            moe.recording = False
        try:
            return setup(*args, **kwargs)
        finally:
            for moe in moes:
                moe.recording = True
    schedule._initialize_pp_stages = quiet_setup


def pipeline_forward_backward(pm, inputs, targets, amp, positions=None) -> torch.Tensor:
    """One step of the schedule over the local batch; the mean loss on the last stage's rank, else 0.
    ``positions`` (packed documents) reach every stage: the schedule splits keyword inputs into microbatches and
    hands them to each stage's forward."""
    losses: list[torch.Tensor] = []
    args = (inputs,) if pm.is_first else ()
    kwargs = {"positions": positions} if positions is not None else {}
    with amp():
        pm.schedule.step(*args, target=targets if pm.is_last else None, losses=losses if pm.is_last else None,
                         return_outputs=False, **kwargs)
    if pm.is_last:
        return torch.stack([l.detach().float() for l in losses]).mean()
    return torch.zeros((), device=inputs.device)


def make_evaluate(parts, ids, dims, schedule: str, pp_group, context=None):
    """Validation under PP, independent of the schedule and its microbatch constraints: each validation batch
    walks the stages in order (forward only; activations sent as fp32 between pp ranks), the last stage sums the
    token losses, and the sum is shared over the pp group. Same windows as without PP."""
    n_stages = dims.pp * dims.pp_stages_per_rank
    owner = {s: r for r in range(dims.pp) for s in stage_ids(schedule, dims.pp, r, dims.pp_stages_per_rank)}
    me, local = dist.get_rank(pp_group), dict(zip(ids, parts))
    dim = parts[0].args.dim

    @torch.no_grad()
    def evaluate(valid, micro, max_batches, device, amp):
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in validation_batches(valid, micro, max_batches):
            batch = batch.to(device)
            (x, y), h = split_batch(batch), None  # SFT: prompt/pad targets are IGNORE
            positions = marked_positions(batch)
            count += int((y != IGNORE_INDEX).sum())
            if context is not None:  # this rank's sequence chunks (context_parallel.py)
                x, y, positions = context.shard_batch(x, y, positions)
            for s in range(n_stages):
                if owner[s] != me:
                    continue
                if s == 0:
                    h = x
                elif owner[s - 1] != me:
                    h = torch.empty(*x.shape, dim, dtype=torch.float32, device=device)
                    dist.recv(h, group=pp_group, group_src=owner[s - 1])
                with amp():
                    h = local[s](h, positions=positions)
                if s == n_stages - 1:
                    total += cross_entropy(h, y, reduction="sum").double()  # also on vocab shards
                elif owner[s + 1] != me:
                    dist.send(h.float().contiguous(), group=pp_group, group_dst=owner[s + 1])
        dist.all_reduce(total, group=pp_group)  # only the last stage's rank holds a non-zero sum
        if context is not None:
            context.sum_(total)
        return (total.item() / count if count else float("nan")), count
    return evaluate
