"""Expert load after each optimizer step: the MoE metrics and DeepSeek-V3's auxiliary-loss-free bias update.

Each MoE block counts, in backward, the routed slots its experts got this step and the auxiliary loss of each
micro batch (llmforge/model/moe.py). One all-reduce over the world of a (layers, experts) table gives every rank
the load of every block (a block's counts add up over the ranks holding it: data-parallel and expert-parallel
ranks route different tokens; pipeline stages fill their own rows). The metrics and the bias update use only
shares of each block's total, so they are the same in every layout.

- ``moe/aux_loss``: the auxiliary loss added to the objective (summed over blocks, mean over micro batches).
- ``moe/max_load``: the largest expert's share of a block's routed slots, averaged over blocks (1 / num_experts
  is perfect balance; 1 means one expert took everything).
- ``moe/dead_experts``: (block, expert) pairs that received no token this step, summed over blocks.
- balance=bias: each expert's bias moves ``bias_update_rate`` towards the mean load (up when under-loaded), only
  on steps whose update was applied; the bias steers selection only, never the routing weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llmforge.model.moe import moe_layers


class MoEBalance:
    def __init__(self, parts: list, margs, pp: int, device):
        self.args, self.n_layers, self.pp = margs.moe, margs.n_layers, pp
        self.layers = [(int(name.split("layers.")[1].split(".")[0]), m)
                       for part in parts for name, m in moe_layers(part)]
        self.device = device
        for _, moe in self.layers:  # what the build left in them (a pipeline stage's set-up forward) is no step's
            moe.reset_stats()

    def after_step(self, finite: torch.Tensor, want_metrics: bool) -> dict:
        """Called by every rank after the optimizer step; returns the metrics when ``want_metrics``."""
        if not (want_metrics or self.args.balance == "bias"):
            return {}
        a = self.args
        counts = torch.zeros(self.n_layers, a.num_experts, device=self.device)
        aux = torch.zeros(1, device=self.device)  # over this rank's blocks: their mean aux loss per micro batch
        for i, moe in self.layers:
            counts[i] = moe.tokens_per_expert
            aux += moe.aux_total / moe.aux_batches.clamp(min=1)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            both = torch.cat([counts.flatten(), aux])
            dist.all_reduce(both)
            counts, aux = both[:-1].view_as(counts), both[-1:]
        if a.balance == "bias":
            mean = counts.mean(-1, keepdim=True)
            step = a.bias_update_rate * torch.sign(mean - counts) * finite.to(counts.dtype)
            with torch.no_grad():
                for i, moe in self.layers:
                    moe.expert_bias += step[i].to(moe.expert_bias.dtype)
        for _, moe in self.layers:
            moe.reset_stats()
        if not want_metrics:
            return {}
        rows = counts[counts.sum(-1) > 0]
        holders = world // self.pp  # every block is held by the world / pp ranks of its stage
        out = {"moe/max_load": float((rows.max(-1).values / rows.sum(-1)).mean()) if len(rows) else 0.0,
               "moe/dead_experts": int((rows == 0).sum())}
        if a.balance == "aux_loss":
            out["moe/aux_loss"] = float(aux[0]) / holders
        return out
