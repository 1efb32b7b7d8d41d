"""Activation recomputation per transformer block (applied after TP, before compile and FSDP).

- ``full``: the whole block is recomputed in backward (only its input is kept); ``recompute_every=k`` applies it
  to blocks whose global layer id is a multiple of k, so the choice does not depend on the pipeline split.
- ``selective``: op-level selective activation checkpointing: matmul, attention and collective outputs are kept,
  the cheap element-wise work (norms, activations, RoPE, residual adds) is recomputed.
Wrapping inserts ``_checkpoint_wrapped_module`` into parameter names; the DCP state-dict helpers strip it, so
checkpoints keep the plain names and move freely between runs with and without recomputation.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten


def _save_list() -> set:
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default}
    for name in ("_scaled_dot_product_cudnn_attention",):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    c10d = torch.ops._c10d_functional
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
        if hasattr(c10d, name):
            ops.add(getattr(c10d, name).default)
    return ops


_SAVE = _save_list()


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: str, every: int = 1) -> None:
    """Wrap the blocks of ``model`` (a Transformer or a pipeline stage) in place."""
    if mode == "none":
        return
    for name, block in list(model.layers.items()):
        if mode == "full":
            if int(name) % every:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=partial(create_selective_checkpoint_contexts, _policy))
        else:
            raise ValueError(f"recompute: unknown mode {mode!r}")
        model.layers[name] = wrapped

