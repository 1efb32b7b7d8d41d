"""Per-rank memory and communication model of a layout, read off the real (meta-device) setup path.

States are counted, not estimated: parameters are the local shards this rank's ``ParallelModel`` holds,
gradients have the same local shapes and dtypes (FSDP2 reduces into fp32 shards, DDP/TP keep fp32 grads), and
optimizer bytes are the AdamW moments the optimizer creates when its checkpoint state dict is built (the scalar
``step`` counters are left out). A CPU run of the same layout holds exactly these bytes (tests/parallel/
test_dryrun.py).

Activations are measured on the meta device: one micro batch goes through this rank's stages (TP applied, in
the compute dtype, attention as the flash kernel GPUs run) and every tensor saved for backward is summed once
per storage. Recompute: ``full`` keeps only each checkpointed block's input (+ one block recomputed at a time);
``selective`` is counted as no recompute (an upper bound). Pipeline schedules keep several micro batches in
flight (``inflight_chunks``). Transient buffers: FSDP's unsharded parameters/gradients of the blocks being
computed, DDP's gradient buckets. Communication is the ring-algorithm volume each rank sends per optimizer step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from llmforge.model.init import canonical_name

def local_bytes(t) -> int:
    if t is None:
        return 0
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def local_numel(t) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).numel()


@dataclass
class RankMemory:
    rank: int
    stages: list[int]
    params: int = 0               # parameter elements held (local shards)
    param_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0     # micro batches in flight x saved activations
    transient_bytes: int = 0      # FSDP unsharded blocks / DDP buckets / recompute of one block
    checkpoint_bytes: int = 0     # what this rank writes into a checkpoint (model + optimizer shards)
    comm_bytes: dict = field(default_factory=dict)   # mesh dim -> bytes sent per optimizer step

    @property
    def peak_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes + self.transient_bytes

    def components(self) -> dict[str, int]:
        return {"params": self.param_bytes, "grads": self.grad_bytes, "optimizer": self.optim_bytes,
                "activations": self.activation_bytes, "transient": self.transient_bytes}


def grad_bytes(name: str, p, fsdp: bool) -> int:
    """Bytes of ``p``'s gradient. Same local shape as the parameter, except DTensor's backward of the
    vocab-parallel embedding, which returns a replicated (full-vocabulary) gradient; FSDP reduce-scatters that
    back into the shard."""
    if not p.requires_grad:
        return 0
    if isinstance(p, DTensor) and not fsdp and canonical_name(name) == "tok_embeddings.weight":
        return p.numel() * p.element_size()
    return local_bytes(p)


def state_bytes(parts: list[nn.Module], optimizers, fsdp: bool = False) -> tuple[int, int, int, int]:
    """(parameter elements, parameter bytes, gradient bytes, optimizer-state bytes) this rank holds."""
    from .data_parallel import local_optimizer
    named = [(n, p) for part in parts for n, p in {id(q): (n, q) for n, q in part.named_parameters()}.values()]
    params = [p for _, p in named]
    n = sum(local_numel(p) for p in params)
    pb = sum(local_bytes(p) for p in params)
    gb = sum(grad_bytes(name, p, fsdp) for name, p in named)
    ob = sum(local_bytes(v) for opt in optimizers for s in local_optimizer(opt).state.values()
             for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor))
    return n, pb, gb, ob


# ------------------------------------------------------------------------------------------------ activations
def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What a GPU saves for attention (q, k, v, out, logsumexp) instead of the math path's B x H x S x S scores.
    Under GQA the K/V heads are counted once per query head (an upper bound for kernels that read them shared)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def measure_activations(parts: list[nn.Module], first: list[bool], last: list[bool], micro: int, seq: int,
                        dtype: torch.dtype, loss_fn, flash: bool) -> list[dict]:
    """Bytes saved for backward by one micro batch through each of ``parts`` (same device as the parts):
    ``{"blocks": {layer id: bytes}, "other": bytes}`` per part. Parameters are not activations."""
    out = []
    for part, is_first, is_last in zip(parts, first, last):
        params = {local_tensor_storage(p) for p in part.parameters()}
        seen: dict = {}
        current = [None]

        def pack(t):
            key = local_tensor_storage(t)
            if key not in params and key not in seen:
                seen[key] = (current[0], (t.to_local() if isinstance(t, DTensor) else t).untyped_storage().nbytes())
            return t
        hooks = []
        for name, block in part.layers.items():
            hooks.append(block.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
            hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        device = next(part.parameters()).device
        tokens = torch.zeros(micro, seq, dtype=torch.long, device=device)
        x = tokens if is_first else torch.zeros(micro, seq, part.args.dim, dtype=dtype, device=device,
                                                requires_grad=True)
        patch = mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa) if flash else contextlib.nullcontext()
        try:
            with patch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = part(x)
                if is_last and loss_fn is not None:
                    loss_fn(y, tokens)
        finally:
            for h in hooks:
                h.remove()
        blocks: dict = {}
        other = 0
        for owner, nbytes in seen.values():
            if owner is None:
                other += nbytes
            else:
                blocks[owner] = blocks.get(owner, 0) + nbytes
        out.append({"blocks": blocks, "other": other})
    return out


def local_tensor_storage(t):
    from torch.multiprocessing.reductions import StorageWeakRef
    t = t.to_local() if isinstance(t, DTensor) else t
    return StorageWeakRef(t.untyped_storage())


def inflight_chunks(schedule: str, pp: int, pp_rank: int, stages_per_rank: int, n_micro: int) -> int:
    """Micro-batch x local-stage activation sets alive at once on ``pp_rank`` (the usual schedule analyses)."""
    if pp == 1:
        return 1
    s, v = schedule.lower(), stages_per_rank
    if s == "gpipe" or s == "loopedbfs":
        return n_micro * v                                  # every forward before any backward
    if s == "1f1b":
        return min(n_micro, pp - pp_rank)
    if s in ("interleaved1f1b", "interleavedzerobubble"):  # Megatron's warm-up count + 1
        return min(n_micro * v, (pp - pp_rank - 1) * 2 + (v - 1) * pp + 1)
    return min(n_micro * v, 2 * pp)                         # V schedules (ZBV, DualPipeV): ~2 pp chunks


def activation_totals(measured: list[dict], cfg, dims, pp_rank: int, micro: int, seq: int, dim: int,
                      dtype_bytes: int) -> tuple[int, int]:
    """(activation bytes in flight, transient recompute bytes) from the per-part measurement."""
    mode, every = cfg.recompute, max(1, cfg.recompute_every)
    tp_seq = seq // dims.tp if (dims.tp > 1 and cfg.parallel.sequence_parallel) else seq
    per_part, recompute_peak = [], 0
    for m in measured:
        total = m["other"]
        for name, nbytes in m["blocks"].items():
            if mode == "full" and int(name) % every == 0:
                total += micro * tp_seq * dim * dtype_bytes   # the block's input only
                recompute_peak = max(recompute_peak, nbytes)
            else:
                total += nbytes
        per_part.append(total)
    n_micro = dims.pp_microbatches if dims.pp > 1 else 1
    chunks = inflight_chunks(cfg.parallel.pp_schedule, dims.pp, pp_rank, dims.pp_stages_per_rank, n_micro)
    mean_part = sum(per_part) / len(per_part)
    return int(round(chunks * mean_part)), recompute_peak


def add_context_parallel_kv(measured: list[dict], dims, micro: int, seq: int, margs, esize: int,
                            accum: int, comm: str = "allgather") -> dict:
    """Context parallelism: activations were measured on this rank's seq / cp tokens. ``allgather``: attention
    also keeps the K/V gathered from the other cp ranks ((cp - 1) / cp of the sequence, its kv heads / tp) for
    backward, added to each block in ``measured``; per block and micro batch the K/V all-gather forward and
    their gradients' reduce-scatter backward. ``alltoall``: the head-sharded q/k/v/out hold as many bytes as the
    local ones (nothing added); per block and micro batch 4 all-to-alls forward and 4 backward, (cp - 1) / cp of
    each leaving the rank. Returns the cp bytes sent per optimizer step."""
    if dims.cp == 1:
        return {}
    cp, tp, hd = dims.cp, dims.tp, margs.head_dim
    n_blocks = sum(len(m["blocks"]) for m in measured)
    n_micro = dims.pp_microbatches if dims.pp > 1 else accum
    if comm == "alltoall":
        kv_heads = margs.n_kv_heads // tp if (margs.n_kv_heads // tp) % cp == 0 else margs.n_heads // tp
        local = micro * (seq // cp) * hd * esize
        per_block = 2 * local * (margs.n_heads // tp + kv_heads) * (cp - 1) / cp  # q, out; k, v
        return {"cp": int(n_micro * n_blocks * 2 * per_block)}
    kv_dim = margs.n_kv_heads // tp * hd
    others = micro * (seq - seq // cp) * kv_dim * esize * 2     # K and V of the other ranks' tokens
    for m in measured:
        for name in m["blocks"]:
            m["blocks"][name] += others
    return {"cp": int(n_micro * n_blocks * 2 * others)}


# ------------------------------------------------------------------------------------------------ transient, comm
def block_param_numels(parts: list[nn.Module], skip_experts: bool = False) -> tuple[dict[str, int], int]:
    """Local parameter elements per transformer block, and of everything outside the blocks (the FSDP root).
    ``skip_experts``: leave out the routed experts (under EP they are gathered over efsdp only)."""
    blocks, root = {}, 0
    for part in parts:
        for name, p in part.named_parameters():
            name = canonical_name(name)
            if skip_experts and ".moe.experts." in name:
                continue
            if name.startswith("layers."):
                key = name.split(".")[1]
                blocks[key] = blocks.get(key, 0) + local_numel(p)
            else:
                root += local_numel(p)
    return blocks, root


def transient_and_comm(parts, cfg, dims, micro: int, accum: int, seq: int, compute_bytes: int, margs,
                       grad_bytes: int, ids: list[int], pp_rank: int) -> tuple[int, dict]:
    """FSDP/DDP buffers alive while a block computes, and bytes sent per optimizer step per mesh dim."""
    p, zero = cfg.parallel, cfg.parallel.zero_stage
    blocks, root = block_param_numels(parts, skip_experts=dims.ep > 1)
    n_micro = dims.pp_microbatches if dims.pp > 1 else accum
    transient, comm = 0, {}
    if dims.ep > 1:
        transient, comm = expert_parallel_bytes(parts, dims, micro, n_micro, seq, compute_bytes, margs)
    if zero in (2, 3):
        shard = dims.dp_shard
        full = {k: v * shard for k, v in blocks.items()}            # block parameters gathered over dp_shard
        biggest = max(full.values(), default=0)
        keep_all = zero == 2 or dims.pp > 1                        # no reshard after forward
        gathered = (sum(full.values()) if keep_all else 2 * biggest) + root * shard
        transient += gathered * compute_bytes + biggest * 4        # + one block's fp32 gradient before reduce-scatter
        if zero == 2 and accum > 1:
            transient += sum(full.values()) * 4                    # unsharded gradients accumulate locally
        ring = (shard - 1) / shard
        total = (sum(full.values()) + root * shard)
        gathers = 2 if (zero == 3 and not keep_all) else 1
        scatters = n_micro if zero == 3 else 1
        comm["dp_shard"] = int(ring * total * (gathers * n_micro * compute_bytes + scatters * 4))
        if dims.dp_replicate > 1:                                   # HSDP: all-reduce of the gradient shards
            comm["dp_replicate"] = int(2 * (dims.dp_replicate - 1) / dims.dp_replicate * grad_bytes)
    elif dims.dp_replicate > 1:
        r = dims.dp_replicate
        comm["dp_replicate"] = int(2 * (r - 1) / r * grad_bytes) + (int((r - 1) / r * grad_bytes) if zero == 1 else 0)
        if not (dims.pp > 1 or dims.tp > 1):
            transient += grad_bytes                                 # DDP's gradient buckets
    act = micro * seq * margs.dim * compute_bytes                   # one residual-stream tensor
    if dims.tp > 1:
        t = dims.tp
        per_block = 8 * act * (t - 1) / t                          # 2 gathers/reduces forward + 2 backward
        vocab_gather = 0 if p.loss_parallel else micro * seq * margs.vocab_size * compute_bytes * (t - 1) / t
        has_out = any(i == dims.pp * dims.pp_stages_per_rank - 1 for i in ids)
        comm["tp"] = int(n_micro * (per_block * len(blocks) + (vocab_gather if has_out else 0)))
    if dims.pp > 1:
        n_stages = dims.pp * dims.pp_stages_per_rank
        sends = sum(1 for i in ids if i < n_stages - 1)
        comm["pp"] = int(2 * n_micro * sends * micro * seq * margs.dim * compute_bytes)  # activations + grads
    return int(transient), comm


def expert_parallel_bytes(parts, dims, micro: int, n_micro: int, seq: int, compute_bytes: int,
                          margs) -> tuple[int, dict]:
    """EP under an even load: per MoE block and micro batch the routed rows (micro x seq x top_k, dim wide) go
    out and come back (dispatch, combine) in forward and again in backward, (ep - 1) / ep of them to other ranks;
    a rank holds one block's received rows and their expert-major copy while it computes (the dispatch buffers),
    and gathers its experts' slice over efsdp (plus its fp32 gradient before the reduce-scatter)."""
    from llmforge.model.moe import moe_layers
    ep, efsdp = dims.ep, dims.dp_shard // dims.ep
    n_moe = sum(len(moe_layers(part)) for part in parts)
    experts = max((sum(local_numel(p) for p in moe.experts.parameters())
                   for part in parts for _, moe in moe_layers(part)), default=0)
    rows = micro * seq * margs.moe.top_k
    row_bytes = rows * margs.dim * compute_bytes
    comm = {"ep": int(n_micro * n_moe * 4 * row_bytes * (ep - 1) / ep)}
    if efsdp > 1:
        comm["efsdp"] = int(n_moe * experts * efsdp * (efsdp - 1) / efsdp * (2 * n_micro * compute_bytes + 4))
    transient = 2 * row_bytes + experts * efsdp * (2 * compute_bytes + 4)
    return transient, comm
