"""ZeRO-2 / ZeRO-3 / HSDP with FSDP2 (``fully_shard``): each block is one communication unit, then the root.

- zero_stage 3: parameters are re-sharded after forward (gathered again for backward): ~1/N of the parameters
  live between layers. zero_stage 2: the gathered parameters stay until backward (one all-gather per step).
  Gradients and optimizer state are sharded in both. Under pipeline parallelism parameters are never re-sharded
  after forward: each microbatch would all-gather again, and zero-bubble schedules (split input/weight
  backward) compute wrong weight gradients with reshard_after_forward=True.
- HSDP: with dp_replicate > 1 the mesh is 2-D (replicate, shard): shard within a group, all-reduce across groups.
- Expert parallelism: each rank's slice of experts (a DTensor over ep) is sharded over the rest of dp_shard
  (efsdp, and dp_replicate as HSDP), its gradient divided by the whole data-parallel size (expert_parallel.py).
- bf16: parameters are cast to bf16 for compute, gradients reduced in fp32, master weights stay fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def fsdp_mesh(mesh: DeviceMesh, dims) -> DeviceMesh:
    """dp_shard, with context parallelism dp_shard x cp (the cp ranks hold the same weights); HSDP adds
    dp_replicate as the replicate dimension."""
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]


def expert_fsdp_mesh(mesh: DeviceMesh, dims) -> DeviceMesh:
    return mesh["dp_replicate", "efsdp"] if dims.dp_replicate > 1 else mesh["efsdp"]


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, zero_stage: int, pipelined: bool,
               param_dtype: torch.dtype = torch.float32, expert_mesh: DeviceMesh | None = None,
               dp_size: int = 1) -> nn.Module:
    reshard = zero_stage == 3 and not pipelined
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if expert_mesh is not None and moe is not None:
            fully_shard(moe.experts, mesh=expert_mesh, reshard_after_forward=reshard, mp_policy=mp)
            # its local gradient already sums the ep group's tokens: average over every data-parallel rank
            moe.experts.set_gradient_divide_factor(float(dp_size))
            # gloo has no PREMUL_SUM: reduce-scatter with SUM, then divide. Not on a 1-rank shard group, where
            # FSDP already divides in its local copy and would divide a second time
            moe.experts.set_force_sum_reduction_for_comms(expert_mesh.size(expert_mesh.ndim - 1) > 1)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # the root (embeddings, final norm, output): its parameters are needed again at the start of backward
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def make_set_sync(parts: list[nn.Module], zero_stage: int):
    """Gradient accumulation hook for the train loop: ``set_sync(last_microbatch)``.

    ZeRO-2 accumulates unsharded gradients locally and reduce-scatters once, on the last microbatch (fewer
    collectives, ZeRO-1-like gradient memory during accumulation). ZeRO-3 reduce-scatters every microbatch
    into the sharded gradient (memory stays at 1/N)."""
    def set_sync(last: bool) -> None:
        for part in parts:
            part.set_requires_gradient_sync(last or zero_stage == 3)
    return set_sync
