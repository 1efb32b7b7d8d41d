"""Layout-independent weight initialisation: every value is a pure function of (seed, parameter name, position).

Why: a model built on the meta device and materialised as shards (FSDP, TP, pipeline stages) must start from
exactly the weights one process would have; drawing from one global RNG stream in module order cannot give
that (each rank only owns a slice). Here a 2-D weight is cut into fixed row blocks (their size depends only on
the global shape); block ``b`` of parameter ``name`` is drawn (``normal_``) from a generator seeded with a hash of
(seed, name, b). A rank that owns rows ``I`` and columns ``J`` draws only the blocks covering ``I`` and keeps
columns ``J``, so it never holds more than its rows of one tensor, and the result equals the single-process
tensor's slice bit for bit (on the same device type).

The distributions are the model's (``Transformer.init_weights``): normal(0.02) for embeddings and input
projections, 0.02/sqrt(2L) for the residual output projections (wo, w2), 0.01 for GPT-2 positions, dim^-0.5 for
an untied output head, ones/zeros for norms and biases; LoRA adapters: A normal(1/sqrt(fan in)), B zeros.
"""
from __future__ import annotations

import hashlib
import math

import torch

from llmforge.core.params import canonical_name

from .blocks import ModelArgs

BLOCK_ELEMENTS = 1 << 22  # values per RNG block (16 MiB of fp32): bounds the transient memory of one draw


def init_spec(name: str, args: ModelArgs) -> tuple[str, float]:
    """("normal", std) | ("ones", 0) | ("zeros", 0) for a parameter of the plain model, by name."""
    name = canonical_name(name)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or name.endswith("_norm.bias") or name == "norm.bias" or leaf == "lora_b":
        return "zeros", 0.0
    if leaf == "lora_a":  # LoRA's down projection (llmforge/model/lora.py): std 1/sqrt(fan in) of its layer
        layer = name.rsplit(".", 2)[-2]
        return "normal", {"w2": args.ffn_dim, "wo": args.n_heads * args.head_dim}.get(layer, args.dim) ** -0.5
    if "norm" in name.rsplit(".", 2)[-2]:  # attention_norm / ffn_norm / norm weights
        return "ones", 0.0
    if name == "tok_embeddings.weight":
        return "normal", 0.02
    if name == "pos_embeddings.weight":
        return "normal", 0.01
    if name == "output.weight":
        return "normal", args.dim ** -0.5
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "moe.shared.w2.weight", "moe.experts.w2")):
        return "normal", 0.02 / math.sqrt(2 * args.n_layers)
    if name.endswith((".wq.weight", ".wk.weight", ".wv.weight", ".w1.weight", ".w3.weight", "moe.router.gate.weight",
                      "moe.experts.w1", "moe.experts.w3")):
        return "normal", 0.02
    raise ValueError(f"no initialisation rule for parameter {name!r}")


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normal_values(seed: int, name: str, shape: tuple[int, int], std: float, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None, device: torch.device | str = "cpu",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` x columns ``cols`` (global indices; default all) of a 2-D parameter's initial value (fp32,
    or written into ``out``). Only the row blocks that contain a requested row are drawn."""
    name = canonical_name(name)
    n_rows, n_cols = shape
    rows = torch.arange(n_rows) if rows is None else rows.cpu()
    per_block = max(1, BLOCK_ELEMENTS // n_cols)
    if out is None:
        out = torch.empty(len(rows), n_cols if cols is None else len(cols), device=device)
    out2 = out.view(len(rows), -1)
    contiguous = cols is None and len(rows) > 0 and int(rows[-1] - rows[0]) + 1 == len(rows) and \
        bool((rows[1:] > rows[:-1]).all())
    block_of = rows // per_block
    for b in torch.unique(block_of).tolist():
        start = b * per_block
        size = min(per_block, n_rows - start)
        g = torch.Generator(device=out.device).manual_seed(_block_seed(seed, name, b))
        if contiguous and start >= int(rows[0]) and start + size <= int(rows[-1]) + 1:
            lo = start - int(rows[0])            # the whole block is ours: draw straight into place
            out2[lo:lo + size].normal_(generator=g)
            continue
        sel = (block_of == b).nonzero().squeeze(1)
        vals = torch.empty(size, n_cols, device=out.device).normal_(generator=g)[(rows[sel] - start).to(out.device)]
        if cols is not None:
            vals = vals[:, cols.to(out.device)]
        out2[sel.to(out.device)] = vals.to(out.dtype)
    return out.mul_(std)


@torch.no_grad()
def fill_(tensor: torch.Tensor, name: str, args: ModelArgs, seed: int, global_shape: tuple[int, ...] | None = None,
          rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Write parameter ``name``'s initial value into ``tensor``: the whole parameter, or (for a shard) the rows
    ``rows`` x columns ``cols`` of the ``global_shape`` tensor (for stacked experts: experts ``rows`` x their
    dim-1 indices ``cols``)."""
    kind, std = init_spec(name, args)
    if kind == "ones":
        tensor.fill_(1.0)
    elif kind == "zeros":
        tensor.zero_()
    elif tensor.dim() == 3:  # stacked experts (E, A, B): drawn as the 2-D (E * A, B), row e * A + a
        e, a, b = tuple(global_shape or tensor.shape)
        experts = torch.arange(e) if rows is None else rows.cpu()
        inner = torch.arange(a) if cols is None else cols.cpu()
        flat_rows = (experts[:, None] * a + inner[None, :]).flatten()
        values = normal_values(seed, name, (e * a, b), std, flat_rows, device=tensor.device)
        tensor.copy_(values.view(tensor.shape))
    else:
        if tensor.dim() != 2:
            raise ValueError(f"{name}: normal init expects a 2-D weight, got shape {tuple(tensor.shape)}")
        shape = tuple(global_shape or tensor.shape)
        if tensor.dtype == torch.float32 and tensor.is_contiguous():
            normal_values(seed, name, shape, std, rows, cols, out=tensor)
        else:
            tensor.copy_(normal_values(seed, name, shape, std, rows, cols, tensor.device))


@torch.no_grad()
def init_full_model(model: torch.nn.Module, seed: int) -> None:
    """Initialise an unsharded model (every parameter whole) with the layout-independent rule."""
    for name, p in model.named_parameters():
        fill_(p.data, name, model.args, seed)
