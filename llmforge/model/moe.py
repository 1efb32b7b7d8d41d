"""Mixture-of-experts feed-forward (Qwen3-MoE / DeepSeek style). No parallel code in here.

- ``Router``: a linear gate, softmax or sigmoid scores, top-k experts per token (selected on score + expert bias
  when balance=bias, weighted by the score alone), optional renormalisation of the k weights and a route scale.
- ``GroupedExperts``: ``num_experts`` SwiGLU experts held as stacked weights w1/w3 (E, F, H) and w2 (E, H, F),
  the layout of the hub's per-expert ``gate_proj``/``up_proj``/``down_proj``. Input rows arrive sorted by expert
  with the count of each; on CUDA a grouped GEMM (``torch._grouped_mm``) computes them, elsewhere an exact loop.
  Expert parallelism (llmforge/parallel/expert_parallel.py) wraps this module's call from outside.
- ``MoE``: dropless token-choice routing (every token reaches its k experts; no capacity), optional shared
  experts, and balancing by a per-sequence Switch/GShard auxiliary loss or DeepSeek-V3's auxiliary-loss-free
  expert bias (updated from the observed load after each optimizer step, outside the gradient:
  llmforge/train/moe_balance.py).

The auxiliary loss is per sequence (f and P of each sequence, then their mean), so its value does not depend on
how sequences are spread over ranks and micro batches. It enters training through ``_AddAuxGrad``: the forward
output is unchanged (the trainer's loss stays the language-model loss) and backward adds the auxiliary loss's
gradient, scaled like the language-model loss of its micro batch (``aux_grad_scale``, set by the engine). The
same backward records the routed-token counts and the auxiliary value once per micro batch (a recomputed forward
does not count twice, an evaluation forward not at all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.core.params import local_tensor


@dataclass
class MoEArgs:
    num_experts: int = 0          # 0: dense model
    top_k: int = 2
    ffn_dim: int = 0              # each expert's hidden size (0: the model's ffn_dim)
    shared_experts: int = 0       # always-on experts of ffn_dim each, held as one SwiGLU of shared * ffn_dim
    score: str = "softmax"        # softmax | sigmoid
    balance: str = "aux_loss"     # aux_loss | bias | none
    aux_loss_coef: float = 0.01
    norm_topk: bool = True        # renormalise the k weights to sum 1 (Qwen3-MoE)
    route_scale: float = 1.0
    dense_layers: int = 0         # leading blocks that stay dense
    interval: int = 1             # after those, every interval-th block is MoE
    bias_update_rate: float = 1e-3

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.dense_layers and (layer - self.dense_layers) % self.interval == 0


class Router(nn.Module):
    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.num_experts, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None):
        """x (N, H) -> scores (N, E) fp32, expert ids (N, k), weights (N, k) in x's dtype."""
        a = self.args
        logits = self.gate(x).float()
        scores = torch.sigmoid(logits) if a.score == "sigmoid" else torch.softmax(logits, dim=-1)
        select = scores + bias.float() if bias is not None else scores
        idx = select.topk(a.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if a.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if a.score == "sigmoid" else 0.0))
        return scores, idx, (weights * a.route_scale).to(x.dtype)


def _grouped_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16


class GroupedExperts(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, H): rows sorted by expert, ``counts`` (E_local,) rows of each; returns (M, H)."""
        # the local experts when expert parallelism made them DTensors: the math is per expert, shard-agnostic
        w1, w2, w3 = local_tensor(self.w1), local_tensor(self.w2), local_tensor(self.w3)
        if _grouped_available(x):
            return grouped_mm_experts(x, counts, w1, w2, w3)
        return loop_experts(x, counts, w1, w2, w3)


def loop_experts(x, counts, w1, w2, w3) -> torch.Tensor:
    """The exact path: one SwiGLU per expert on its rows. The stacked weights are unbound once: indexing them per
    expert (``w1[e]``) would make backward build a zero-filled (E, F, H) gradient for every expert and add them
    up (E times the weights' size in memory traffic per projection); unbind's backward stacks the E slices once."""
    outs, start = [], 0
    w1, w2, w3 = w1.unbind(0), w2.unbind(0), w3.unbind(0)
    for e, n in enumerate(counts.tolist()):
        rows = x[start:start + n]
        outs.append((F.silu(rows @ w1[e].T) * (rows @ w3[e].T)) @ w2[e].T)
        start += n
    return torch.cat(outs) if outs else x[:0]


def grouped_mm_experts(x, counts, w1, w2, w3) -> torch.Tensor:
    """One grouped GEMM per projection (CUDA, bf16): ``offs`` are the cumulative row counts."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)) * \
        torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


class SharedExperts(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _AddAuxGrad(torch.autograd.Function):
    """Identity on ``out``; backward gives ``aux`` the gradient ``scale`` and records the micro batch's stats."""

    @staticmethod
    def forward(ctx, out, aux, counts, moe):
        ctx.moe, ctx.counts, ctx.record = moe, counts, moe.recording
        ctx.aux_value = aux.detach()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        moe = ctx.moe
        if ctx.record:
            moe.tokens_per_expert += ctx.counts.to(moe.tokens_per_expert.dtype)
            moe.aux_total += ctx.aux_value.float()
            moe.aux_batches += 1
        return grad, torch.full_like(ctx.aux_value, moe.aux_grad_scale), None, None


def sequence_aux_loss(scores: torch.Tensor, idx: torch.Tensor, args: MoEArgs) -> torch.Tensor:
    """Switch/GShard balance loss per sequence, averaged over sequences: E * sum_i f_i P_i with f_i the share of
    the sequence's k*S routed slots that went to expert i and P_i its mean (normalised) router score.
    scores (B, S, E), idx (B, S, k)."""
    b, s, e = scores.shape
    counts = torch.zeros(b, e, device=scores.device).scatter_add_(1, idx.reshape(b, -1),
                                                                  torch.ones(b, s * args.top_k, device=scores.device))
    f = counts / (s * args.top_k)
    probs = scores / scores.sum(-1, keepdim=True) if args.score == "sigmoid" else scores
    return args.aux_loss_coef * e * (f * probs.mean(1)).sum(-1).mean()


class MoE(nn.Module):
    def __init__(self, dim: int, default_ffn_dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        ffn = args.ffn_dim or default_ffn_dim
        self.router = Router(dim, args)
        self.experts = GroupedExperts(dim, ffn, args.num_experts)
        self.shared = SharedExperts(dim, ffn * args.shared_experts) if args.shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=args.balance == "bias")
        # per-step statistics, filled by backward (_AddAuxGrad), read and reset by llmforge/train/moe_balance.py
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts), persistent=False)
        self.register_buffer("aux_total", torch.zeros(()), persistent=False)
        self.register_buffer("aux_batches", torch.zeros(()), persistent=False)
        self.aux_grad_scale = 1.0  # the engine sets 1 / (micro batches averaged per step)
        self.recording = True      # off while a pipeline stage runs its set-up pass on placeholder inputs

    def reset_buffers(self) -> None:
        self.expert_bias.zero_()
        self.reset_stats()

    def reset_stats(self) -> None:
        for buf in (self.tokens_per_expert, self.aux_total, self.aux_batches):
            buf.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)
        a = self.args
        scores, idx, weights = self.router(flat, self.expert_bias if a.balance == "bias" else None)
        counts = (torch.bincount(idx.flatten(), minlength=a.num_experts) if not x.is_meta
                  else uniform_counts(idx.numel(), a.num_experts))  # the dry run's shapes: an even load
        order = idx.flatten().argsort(stable=True)  # routed slots grouped by expert, token order inside each
        token = order // a.top_k
        routed = self.experts(flat[token], counts) * weights.flatten()[order, None]
        out = torch.zeros_like(flat).index_add_(0, token, routed)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.view(bsz, seqlen, dim)
        if torch.is_grad_enabled() and self.training:
            aux = (sequence_aux_loss(scores.view(bsz, seqlen, -1), idx.view(bsz, seqlen, -1), a)
                   if a.balance == "aux_loss" else scores.sum() * 0)
            out = _AddAuxGrad.apply(out, aux, counts.detach(), self)
        return out


def uniform_counts(slots: int, experts: int) -> torch.Tensor:
    """Rows per expert under a perfectly even load (a CPU tensor: meta tensors hold no routing decisions)."""
    base, extra = divmod(slots, experts)
    return torch.tensor([base + (e < extra) for e in range(experts)])


def moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
