"""Context parallelism (CP): every sequence is split over ``parallel.cp`` ranks; attention gathers the keys.

Layout. The cp ranks of one data-parallel rank read the same samples; each keeps 2 of the sequence's 2 x cp
equal chunks, chunk r and chunk 2cp-1-r (head-tail, the zig-zag of Megatron-LM and torchtitan), so under the
causal mask every rank does the same attention work. Everything but attention (embeddings, norms, MLPs,
the loss) runs on the local tokens only: activation memory is 1/cp per rank.

Attention (``parallel.cp_comm``), both with the mask built from global token indices and document starts
(``llmforge.model.attention.build_mask``: a boolean SDPA mask on CPU, a FlexAttention BlockMask on CUDA):
- ``allgather`` (default): each rank all-gathers K and V over the cp group and computes its local queries against
  the whole sequence (Llama 3's context parallelism, chosen for the same reason: it composes exactly with
  document masks). The gather's backward is a reduce-scatter of the K/V gradients (all-reduce + slice on gloo).
  With GQA the exchanged K/V are n_kv_heads / n_heads of the queries' size: per layer and micro batch a rank
  receives 2 x (cp-1)/cp x B x S x kv_dim elements forward, the same again for the gradients.
- ``alltoall`` (DeepSpeed-Ulysses): q, k, v go from sequence shards to head shards by all-to-all, each rank
  attends over the whole sequence with n_heads / cp heads, and the output goes back; 4 all-to-alls of the
  local q/k/v/out forward and 4 backward, each (cp-1)/cp of the tensor leaving the rank, independent of
  cp for the bytes per rank. Needs n_heads / tp divisible by cp (K/V heads that do not divide are repeated).

Loss and gradients. The loss of a rank is the mean over its local tokens (S/cp each, equal on every rank), the
gradient average runs over dp x cp (FSDP shards over dp_shard x cp, as torchtitan; DDP / the TP all-reduce over
dp_replicate x cp), so the step equals one process. Positions always travel with the tokens (the global index,
or the position in the document with ``data.document_mask``) so RoPE sees each token where it is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from llmforge.model.attention import TokenLayout, build_mask, masked_attention


def chunk_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global indices of the tokens cp rank ``rank`` holds: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


class ContextSplit:
    """The cp group of this rank and how it cuts a (batch, seq) tensor into its local chunks."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        return t.index_select(1, chunk_index(t.shape[1], self.size, self.rank, t.device))

    def shard_batch(self, inputs, targets, positions=None):
        """Local chunks of (inputs, targets, positions); positions default to the global token indices."""
        if positions is None:
            b, n = inputs.shape[:2]
            positions = torch.arange(n, device=inputs.device).expand(b, n)
        return self.shard(inputs), self.shard(targets), self.shard(positions)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


class _GatherSequence(torch.autograd.Function):
    """(B, H, S_local, D) -> (B, H, cp x S_local, D), rank-major; backward: the sum over ranks of the gradient of
    each rank's slice (reduce-scatter; all-reduce + slice where the backend has none, as gloo). Contiguous
    buffers throughout: gloo reads a strided gradient wrongly."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, cp = group, dist.get_world_size(group)
        b, h, n, d = x.shape
        buf = torch.empty((cp * b, h, n, d), dtype=x.dtype, device=x.device)  # rank-major along dim 0
        dist.all_gather_into_tensor(buf, x.contiguous(), group=group)
        return buf.view(cp, b, h, n, d).permute(1, 2, 0, 3, 4).reshape(b, h, cp * n, d)

    @staticmethod
    def backward(ctx, grad):
        group, cp = ctx.group, dist.get_world_size(ctx.group)
        b, h, total, d = grad.shape
        stacked = grad.reshape(b, h, cp, total // cp, d).permute(2, 0, 1, 3, 4).contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty(stacked.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, stacked.view(cp * b, h, total // cp, d), group=group)
        else:
            dist.all_reduce(stacked, group=group)
            out = stacked[dist.get_rank(group)]
        return out, None


class _ContextAttention(nn.Module):
    """An attention kernel over the cp group (no parameters): ``forward(q, k, v, layout)`` like CoreAttention's."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.cp, self.rank = dist.get_world_size(group), dist.get_rank(group)

    @staticmethod
    def check(layout: TokenLayout | None) -> TokenLayout:
        if layout is None:
            raise RuntimeError("context parallelism needs the tokens' positions (the engine passes them)")
        return layout


class ContextParallelAttention(_ContextAttention):
    """The local queries against the K/V of the whole sequence, gathered over the cp group (see module doc)."""

    def forward(self, q, k, v, layout: TokenLayout | None = None) -> torch.Tensor:
        layout = self.check(layout)
        k_all = _GatherSequence.apply(k, self.group)
        v_all = _GatherSequence.apply(v, self.group)
        return masked_attention(q, k_all, v_all, self.mask(layout, q), q.shape[1] != k.shape[1])

    def mask(self, layout: TokenLayout, q: torch.Tensor):
        """Built once per forward pass (cached on the layout, so every layer and recomputation reuse it)."""
        if "cp" not in layout.cache:
            kv_index, kv_doc = gathered_layout(layout.positions, self.cp, self.group)
            q_index = chunk_index(kv_index.numel(), self.cp, self.rank, kv_index.device)
            layout.cache["cp"] = build_mask(q_index, layout.doc_starts(q_index), kv_index, kv_doc, q)
        return layout.cache["cp"]


class _SequenceToHeads(torch.autograd.Function):
    """(B, H, S_local, D) sequence-sharded -> (B, H / cp, cp x S_local, D) head-sharded (rank-major sequence) by
    one all-to-all; its backward is the inverse exchange (``_HeadsToSequence``), and the other way round."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x, group):
    cp = dist.get_world_size(group)
    b, h, n, d = x.shape
    send = x.reshape(b, cp, h // cp, n, d).transpose(0, 1).contiguous()  # [destination rank] = its heads
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                      # [source rank] = its tokens
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * n, d)


def _heads_to_seq(x, group):
    cp = dist.get_world_size(group)
    b, hl, total, d = x.shape
    send = x.reshape(b, hl, cp, total // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # [destination] = its tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                                # [source] = its heads
    return recv.transpose(0, 1).reshape(b, cp * hl, total // cp, d)


class AllToAllAttention(_ContextAttention):
    """Ulysses (DeepSpeed) context parallelism: all-to-all from sequence shards to head shards, attention over the
    whole sequence for H / cp heads, all-to-all back. K/V heads that do not split over cp are repeated to the
    query heads first. Needs the local heads (n_heads / tp) divisible by cp."""

    def forward(self, q, k, v, layout: TokenLayout | None = None) -> torch.Tensor:
        layout = self.check(layout)
        if k.shape[1] % self.cp:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        qh, kh, vh = (_SequenceToHeads.apply(t, self.group) for t in (q, k, v))
        out = masked_attention(qh, kh, vh, self.mask(layout, qh), qh.shape[1] != kh.shape[1])
        return _HeadsToSequence.apply(out, self.group)

    def mask(self, layout: TokenLayout, like: torch.Tensor):
        """The whole sequence against itself, in the gathered (rank-major chunk) order; once per forward."""
        if "cp" not in layout.cache:
            index, doc = gathered_layout(layout.positions, self.cp, self.group)
            layout.cache["cp"] = build_mask(index, doc, index, doc, like)
        return layout.cache["cp"]


def gathered_layout(positions: torch.Tensor, cp: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(global indices (cp x S_local,), document starts (B, cp x S_local)) of every cp rank's tokens, rank-major."""
    pos = positions.contiguous()
    gathered = [torch.empty_like(pos) for _ in range(cp)]
    dist.all_gather(gathered, pos, group=group)
    seq = pos.shape[1] * cp
    index = torch.cat([chunk_index(seq, cp, r, pos.device) for r in range(cp)])
    return index, index[None, :] - torch.cat(gathered, dim=1)


CP_COMMS = {"allgather": ContextParallelAttention, "alltoall": AllToAllAttention}


def apply_cp(model: nn.Module, cp_group, comm: str = "allgather") -> None:
    """Swap every block's attention kernel for the context-parallel one (no parameters change)."""
    for block in model.layers.values():
        block.attention.core = CP_COMMS[comm](cp_group)
