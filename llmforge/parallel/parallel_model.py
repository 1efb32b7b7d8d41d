"""What every parallelism hands the training engine: the local model parts and typed hooks.

``parallelize`` fills the fields that its layout needs; the methods fall back to the plain single-module
behaviour when a hook is absent, so the engine never probes for layout-specific behaviour by name.
``clip_grad_norm`` is the one gradient norm of every layout (one process included), so they clip alike.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from llmforge.data.streams import validation_batches
from llmforge.model.moe import moe_layers
from llmforge.core.loss import IGNORE_INDEX, cross_entropy, split_batch
from llmforge.core.packing import marked_positions


@dataclass
class ParallelModel:
    """One module per local pipeline stage (one without PP) and the hooks of the layout that produced them."""
    parts: list[nn.Module]
    schedule: object = None           # torch.distributed.pipelining schedule when pp > 1
    is_first: bool = True             # this rank feeds token ids (first pipeline stage)
    is_last: bool = True              # this rank computes the loss (last pipeline stage)
    ddp: bool = False                 # gradients synchronised by DDP (no_sync during accumulation)
    set_sync: Optional[Callable[[bool], None]] = None      # FSDP: reduce-scatter only on the last micro batch
    grad_sync: Optional[Callable[[], None]] = None         # gradient all-reduce where DDP does not apply (TP/PP)
    zero1_optimizers: Optional[list] = None                # ZeRO-1: optimizers over this rank's shard
    loss_group: object = None                               # pp group: the loss lives on the last stage
    clip_fn: Optional[Callable[[float], torch.Tensor]] = None   # norm over DTensor shards and pipeline stages
    eval_fn: Optional[Callable] = None                      # validation that walks the pipeline stages
    context: object = None                                  # cp > 1: ContextSplit (context_parallel.py)

    def parameters(self):
        return (p for part in self.parts for p in part.parameters())

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, micro: int, accum: int, amp,
                         loss_fn, positions: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step's forward/backward over the local batch; the mean loss (valid on the last stage,
        zero elsewhere). ``positions``: packed documents' positions (llmforge/core/packing.py) or None."""
        if self.context is not None:  # this rank's head and tail chunks of every sequence, with their positions
            inputs, targets, positions = self.context.shard_batch(inputs, targets, positions)
        # an MoE auxiliary loss is scaled like its micro batch's LM loss: 1/accum here; the pipeline schedule
        # divides all gradients by its microbatch count itself (scale_grads)
        for part in self.parts:
            for _, moe in moe_layers(part):
                moe.aux_grad_scale = 1.0 if self.schedule is not None else 1.0 / accum
        if self.schedule is not None:
            from llmforge.parallel.pipeline import pipeline_forward_backward
            return pipeline_forward_backward(self, inputs, targets, amp, positions)
        model = self.parts[0]
        total = torch.zeros((), device=inputs.device)
        for i in range(accum):
            sl = slice(i * micro, (i + 1) * micro)
            last = i == accum - 1
            sync = contextlib.nullcontext() if (not self.ddp or last) else model.no_sync()
            if self.set_sync is not None:
                self.set_sync(last)
            pos = positions[sl] if positions is not None else None
            with sync, amp():
                loss = loss_fn(model(inputs[sl], positions=pos), targets[sl])
            (loss / accum).backward()
            total += loss.detach()
        return total / accum

    def finish_grads(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping (clips when max_norm > 0); identical on every rank."""
        if self.clip_fn is not None:
            return self.clip_fn(max_norm)
        return clip_grad_norm(self.parts, max_norm)

    @torch.no_grad()
    def evaluate(self, valid, micro: int, max_batches: int, device, amp) -> tuple[float, int]:
        """Mean token cross-entropy over the validation windows (every rank evaluates the same batches)."""
        if self.eval_fn is not None:
            return self.eval_fn(valid, micro, max_batches, device, amp)
        model = self.parts[0]
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in validation_batches(valid, micro, max_batches):
            batch = batch.to(device)
            x, y = split_batch(batch)  # SFT: prompt/pad targets are IGNORE (llmforge/core/loss.py)
            positions = marked_positions(batch)
            count += int((y != IGNORE_INDEX).sum())
            if self.context is not None:
                x, y, positions = self.context.shard_batch(x, y, positions)
            with amp():
                logits = model(x, positions=positions)
            total += cross_entropy(logits, y, reduction="sum").double()  # also on vocab shards
        if self.context is not None:
            self.context.sum_(total)
        model.train()
        return (float(total) / count if count else float("nan")), count


@torch.no_grad()
def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 gradient norm over every shard (TP/FSDP DTensors, plain replicated tensors, pipeline stages);
    clip to ``max_norm`` when it is > 0. Returns the norm before clipping (float32, identical on every rank).

    The squares are summed in float64 and the root is cast to float32 once: in float32 the norm of a tensor
    depends on how it is split (a shard's partial norms add up in another order than the whole tensor's), so
    the clip coefficient of an FSDP or TP run was 1 ulp off one process's and every weight moved by ~1e-7,
    which float8 rounding turns into whole e4m3 steps within a few steps. In float64 the layouts agree to
    ~1e-16, so the float32 norm is the same number except when it falls within that of a rounding boundary."""
    groups: dict = {}  # plain tensors and DTensors of each (mesh, placements): foreach kernels need uniform lists
    for p in (p for part in parts for p in part.parameters() if p.grad is not None):
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for params in groups.values():
        # dtype: float64 accumulation without a float64 copy of the gradients (CUDA's fused kernel included)
        norms = torch._foreach_norm([p.grad for p in params], 2.0, dtype=torch.float64)
        norm = torch.linalg.vector_norm(torch.stack(norms))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # DTensor norms reduce over their mesh
        sq += norm.to(device) ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt().float()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
