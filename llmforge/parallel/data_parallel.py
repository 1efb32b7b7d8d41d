"""ZeRO-0 (gradient all-reduce) and ZeRO-1 (+ optimizer state sharded) over the dp_replicate ranks.

- Plain data parallelism uses DDP (bucketed all-reduce overlapped with backward; ``no_sync`` during gradient
  accumulation).
- When the model is also tensor- or pipeline-parallel, DDP does not apply (DTensor parameters; pipeline
  schedules run backward piecewise), so ``GradAllReduce`` averages the gradients once per step after the last
  backward, one flat buffer per dtype.
- ZeRO-1: ``torch.distributed.optim.ZeroRedundancyOptimizer`` gives each rank the AdamW state of about 1/N of the
  parameters and broadcasts the updated parameters after ``step``.

Checkpoints under ZeRO-1: each rank saves the state of the parameters it owns, under exactly the keys an
unsharded optimizer would use (``state.<param fqn>.exp_avg``, ...; see ``llmforge.checkpoint.checkpointer``), and DCP writes
the union. Nothing is gathered on one rank, and the checkpoint is indistinguishable from one written by any other
layout: it resumes under DDP/FSDP/TP/PP, and ZeRO-1 resumes from theirs (each rank reads only its own keys).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from llmforge.core.optim import param_groups


def apply_ddp(model: nn.Module, group, device: torch.device) -> DDP:
    # buffers (RoPE tables) are computed identically on every rank: no per-step broadcast
    return DDP(model, process_group=group, device_ids=[device.index] if device.type == "cuda" else None,
               forward_sync_buffers=False)


class GradAllReduce:
    """Average every gradient over ``group`` (call once per step, after the last backward)."""

    def __init__(self, parts: list[nn.Module], group):
        self.parts, self.group = parts, group
        self.world = dist.get_world_size(group)

    @torch.no_grad()
    def __call__(self) -> None:
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for part in self.parts for p in part.parameters() if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for bucket in by_dtype.values():
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=self.group)
            flat /= self.world
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)


def zero1_optimizers(parts: list[nn.Module], tcfg, group) -> list[ZeroRedundancyOptimizer]:
    """One ZeroRedundancyOptimizer(AdamW) per model part, with the decay / no-decay groups of llmforge.core.optim."""
    return [ZeroRedundancyOptimizer([g for g in param_groups([part], tcfg.weight_decay) if g["params"]],
                                    optimizer_class=torch.optim.AdamW, process_group=group, lr=tcfg.lr,
                                    betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
            for part in parts]


def local_optimizer(opt):
    """The optimizer that holds this rank's state: ZeRO-1's local shard optimizer, else ``opt`` itself."""
    return opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
