"""Training losses. The model returns logits; the engine applies one of these (the pipeline schedule too).

``cross_entropy`` is a chunked, fp32-accurate token cross-entropy that never materialises the full fp32 logits:
it walks the tokens in chunks, upcasts one chunk at a time, and computes the gradient of the logits already in
the forward pass (softmax - one-hot, stored in the logits' own dtype), so backward is a multiply. Plain
``F.cross_entropy(logits.float())`` keeps an fp32 copy of the logits, an fp32 log-softmax for backward and an
fp32 gradient: with a 128k vocabulary that is several GB per micro batch (bench/loss_memory.py measures it).

Loss parallel: when the logits are a DTensor sharded over the vocabulary (``parallel.loss_parallel`` under TP:
the output projection stays column-parallel, no all-gather of B x S x V logits), each rank works on its vocab
shard; the row max, the sum of exponentials and the target logit are all-reduced over the TP group (three
B x S vectors instead of the logits), as in Megatron-LM's vocab-parallel cross-entropy.

Masked loss (fine-tuning on SFT data). Batches stay one int64 tensor ``(B, seq_len + 1)``: a token that is *not*
a loss target is stored as ``-1 - id`` (pad too). ``split_batch`` turns that into model inputs (ids) and targets
(``IGNORE_INDEX`` where masked); on a pretraining batch it is the plain shift. ``MaskedLoss`` sums token
cross-entropy over response tokens and divides by the number of response tokens in the **global** batch (an
integer all-reduce over the data-parallel group) times the number of micro batches whose gradients the engine
averages. Every layout (DDP, ZeRO-1/2/3, TP, PP, gradient accumulation) then computes exactly sum(CE over all
response tokens of the step) / their count, instead of a mean of per-micro-batch means that would weigh a token by
how many others share its micro batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100          # F.cross_entropy's default: targets with this id do not count
CHUNK_ELEMENTS = 1 << 25     # logits per fp32 chunk (128 MiB): bounds the transient upcast


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token losses (fp32, 0 where ignored) of (N, V_local) logits; targets (N,) are global vocab ids."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start: int, ignore_index: int):
        n, v_local = logits.shape
        rows = max(1, CHUNK_ELEMENTS // max(v_local, 1))
        grad = torch.empty_like(logits)
        losses = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            x = logits[s:e].to(torch.float32, copy=True)   # one fp32 chunk at a time (never the input)
            m = x.max(dim=-1).values
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            x.sub_(m[:, None])
            t = targets[s:e]
            valid = t != ignore_index
            local_t = t - vocab_start
            own = valid & (local_t >= 0) & (local_t < v_local)   # this rank holds the target's logit
            idx = local_t.clamp(0, v_local - 1)[:, None]
            target = torch.where(own, x.gather(1, idx).squeeze(1), torch.zeros_like(m))
            x.exp_()
            sums = torch.stack([x.sum(dim=-1), target])
            if group is not None:
                dist.all_reduce(sums, group=group)          # sum of exp over the vocab, target logit from its owner
            sumexp, target = sums[0], sums[1]
            losses[s:e] = torch.where(valid, sumexp.log() - target, torch.zeros_like(m))
            x.div_(sumexp[:, None])                        # softmax
            x.scatter_add_(1, idx, -own[:, None].to(x.dtype))  # minus the one-hot of the target
            x.mul_(valid[:, None].to(x.dtype))
            grad[s:e] = x
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        # in place: the buffer is used once (this graph is not run backward twice)
        return grad.mul_(grad_losses[:, None].to(grad.dtype)), None, None, None, None


def _vocab_shard(logits):
    """(local logits, TP group or None, first vocab id of the local shard)."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(logits, DTensor):
        return logits, None, 0
    pl = logits.placements
    if len(pl) != 1 or not isinstance(pl[0], Shard) or pl[0].dim != logits.dim() - 1:
        return logits.full_tensor(), None, 0  # any other layout: the plain (gathered) loss
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, pl)
    return logits.to_local(), logits.device_mesh.get_group(), offset[-1]


def token_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shape of ``targets``; 0 where ``targets == ignore_index``)."""
    local, group, start = _vocab_shard(logits)
    flat = local.reshape(-1, local.shape[-1])
    out = _ChunkedCrossEntropy.apply(flat, targets.reshape(-1).to(flat.device), group, start, ignore_index)
    return out.view(targets.shape)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token cross-entropy like ``F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())`` (same
    ``ignore_index`` rule), chunked, and on vocab shards when ``logits`` is a vocab-sharded DTensor."""
    losses = token_losses(logits, targets, ignore_index)
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    return losses.sum() / (targets != ignore_index).sum().clamp_min(1)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: mean token cross-entropy (fp32 accumulation whatever the logits' dtype)."""
    return cross_entropy(logits, targets)


# ------------------------------------------------------------------------------------------------ masked (SFT)
def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a (B, L + 1) batch: ids shifted by one; masked tokens -> ids / IGNORE_INDEX targets;
    document-start marks (llmforge/core/packing.py) removed."""
    from llmforge.core.packing import raw_ids
    batch = raw_ids(batch)
    x, y = batch[:, :-1], batch[:, 1:]
    return torch.where(x >= 0, x, -1 - x), torch.where(y >= 0, y, torch.full_like(y, IGNORE_INDEX))


class MaskedLoss:
    """loss(logits, targets) = sum of CE over non-ignored targets * scale, scale set once per step by
    ``prepare`` to (dp * micro batches per rank) / (response tokens in the global batch)."""

    def __init__(self):
        self.scale = 1.0

    def prepare(self, targets: torch.Tensor, dp_group, n_micro: int, cp: int = 1) -> int:
        """Count this step's response tokens over the data-parallel group (exact integers, one all-reduce).
        ``cp``: context-parallel ranks share each sequence (and the gradient average), counted once here."""
        n = (targets != IGNORE_INDEX).sum().to(torch.int64).reshape(1)
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(n, group=dp_group)
        dp = dist.get_world_size(dp_group) if dist.is_initialized() else 1
        total = int(n.item())
        self.scale = dp * cp * n_micro / max(total, 1)
        return total

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX) * self.scale
