"""Expert parallelism (EP): each MoE block's experts are sharded over the ``ep`` mesh dimension, and tokens
travel to the rank holding their expert and back with ``all_to_all_single`` (it runs on gloo and NCCL).

The ``ep`` ranks are taken from ``dp_shard`` (torchtitan's layout): the world mesh is (pp, dp_replicate, efsdp,
ep, tp) with dp_shard = efsdp x ep flattened. The non-expert weights stay FSDP-sharded over dp_shard as in a
dense model; each rank's slice of experts (num_experts / ep of them, a DTensor ``Shard(0)`` over ep) is
FSDP-sharded over what remains (efsdp, plus dp_replicate as HSDP), with FSDP's gradient divisor set to the whole
data-parallel size: an expert's local gradient already sums the tokens of every rank in its ep group.

Per MoE block and micro batch: an all-to-all of the routed-slot counts (E integers), then one of the sorted token
rows (the dispatch) and one back (the combine); their backward is the reverse all-to-all. The router, the
weighting and the shared experts run on each rank's own tokens, before and after (llmforge/model/moe.py), so
the model code is the same with and without EP.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Shard

from llmforge.model.moe import GroupedExperts


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts holding num_experts / ep experts; ``forward`` takes this rank's rows sorted by *global*
    expert and the global counts, as the unsharded module does."""

    ep_group = None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group = self.ep_group
        ep = dist.get_world_size(group)
        n_local = counts.numel() // ep
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # [src, local expert] counts for my experts
        per_src = recv_counts.view(ep, n_local)
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = per_src.sum(1).tolist()
        received = _exchange(x, recv_splits, send_splits, group)
        perm = expert_major_order(per_src)  # received rows are source-major; the experts want expert-major
        out = super().forward(received[perm], per_src.sum(0))
        back = torch.empty_like(out).index_copy_(0, perm, out)
        return _exchange(back, send_splits, recv_splits, group)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows (backward: the reverse exchange). torch.distributed.nn's version: the
    functional-collectives one (which torch suggests instead) moved the losses of this layout by 1e-5 here."""
    return all_to_all_single(x.new_empty(sum(out_splits), *x.shape[1:]), x.contiguous(), out_splits, in_splits,
                             group=group)


def expert_major_order(per_src: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder blocks laid out (source, expert) into (expert, source). per_src: (ep, E_local)."""
    lens = per_src.flatten()
    starts = (lens.cumsum(0) - lens).view_as(per_src).T.flatten()
    lens_t = per_src.T.flatten()
    total = int(lens_t.sum())
    seg_start_out = lens_t.cumsum(0) - lens_t
    return torch.repeat_interleave(starts - seg_start_out, lens_t) + torch.arange(total, device=per_src.device)


def apply_ep(model: nn.Module, ep_mesh) -> int:
    """Shard every MoE block's experts over ``ep_mesh`` (a meta or materialised model, before FSDP). Returns the
    number of blocks converted. No communication: each rank keeps its own slice."""
    warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)
    # the combine's output is a view; the MoE block only reads it (out-of-place weighting, index_add_ into zeros)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPExpertParallelExperts\) returned a view")
    rank, ep = ep_mesh.get_local_rank(), ep_mesh.size()
    n = 0
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if moe is None:
            continue
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            mine = full.detach().chunk(ep, dim=0)[rank].clone()
            dt = DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                    stride=full.stride())
            setattr(experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        experts.__class__ = ExpertParallelExperts
        experts.ep_group = ep_mesh.get_group()
        n += 1
    return n
