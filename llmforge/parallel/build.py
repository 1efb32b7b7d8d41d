"""Build the parallel model without ever holding the whole model on one rank: meta device → parallelize → local
shards materialised (``to_empty``) → layout-independent init (or an HF folder read straight into the shards).

``build_parallel_model`` is what the engines call. The model is created on the ``meta`` device (no memory),
pipeline stages are cut from that meta model, TP / recompute / compile / FSDP are applied to meta modules, and
only then does each rank allocate its own shards and fill them. The values come from ``llmforge.model.init``,
a pure function of (seed, parameter name, global position), so any layout starts from exactly the weights of
one process (the layout-equivalence tests compare against a single process that goes through this same path).

With ``device`` = meta nothing is materialised: the dry run (``llmforge.dryrun``) walks the same path on a fake
process group to count what each rank would hold.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import _get_shard_size_and_offsets
from torch.distributed.tensor.placement_types import _StridedShard

from llmforge.hf import LlamaSafetensorsReader, check_hf_shape, import_hf
from llmforge.model.lora import is_adapter
from llmforge.model.moe import moe_layers
from llmforge.model.blocks import model_rope_tables
from llmforge.model.freeze import apply_finetune
from llmforge.core.params import local_tensor
from llmforge.model.init import canonical_name, fill_, init_full_model
from llmforge.model.transformer import Transformer


def meta_model(margs) -> Transformer:
    """The whole model on the meta device: shapes and names only, no storage."""
    with torch.device("meta"):
        return Transformer(margs)


def build_model(margs, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """An unsharded model with the layout-independent initial weights (what one process of
    ``build_parallel_model`` holds): for engines that shard the model themselves (DeepSpeed) and for tools."""
    model = materialize_empty(meta_model(margs), device)
    init_full_model(model, seed)
    init_buffers(model, device)
    return model


def build_parallel_model(margs, dims, mesh, cfg, device: torch.device, loss_fn=None,
                         init_from_hf: str | None = None):
    """The ``ParallelModel`` for this rank: built on meta, parallelised, local shards materialised on ``device``
    and initialised from ``cfg.seed`` (or loaded from the Hugging Face folder ``init_from_hf``)."""
    from .apply import parallelize_all
    torch.manual_seed(cfg.seed)  # the global RNG starts where it always did (the weights do not use it)
    model = meta_model(margs)
    apply_finetune(model, cfg.train, cfg.seed)  # LoRA adapters, train.freeze: before any parallelism
    materialize = None
    if torch.device(device).type != "meta":
        def materialize(parts: list[nn.Module]) -> None:
            for part in parts:
                materialize_empty(part, device)
                init_local_params(part, margs, cfg.seed)
                init_buffers(part, device)
            if init_from_hf:
                load_hf_sharded(parts, init_from_hf, margs)
    return parallelize_all(model, dims, mesh, cfg, device, loss_fn, materialize=materialize)


# ------------------------------------------------------------------------------------------------ local shards
def materialize_empty(module: nn.Module, device) -> nn.Module:
    """``to_empty`` (allocates this rank's shards, uninitialised) and re-tie the output head to the embedding:
    ``to_empty`` replaces each module's parameter separately, which would untie them."""
    module.to_empty(device=device)
    if module.args.tie_embeddings and module.tok_embeddings is not None and module.output is not None:
        module.output.weight = module.tok_embeddings.weight
    return module


def local_index(p: torch.Tensor) -> dict[int, torch.Tensor]:
    """Global indices this rank holds of a DTensor parameter, per sharded tensor dim ({} for a plain tensor).
    Handles uneven shards and FSDP's strided sharding on top of TP (same rules as DTensor's own offsets)."""
    if not isinstance(p, DTensor):
        return {}
    mesh, coord = p.device_mesh, p.device_mesh.get_coordinate()
    sizes, out = list(p.shape), {}
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, (Shard, _StridedShard)):
            size, idx = _get_shard_size_and_offsets(sizes[pl.dim], mesh.size(mesh_dim), coord[mesh_dim], pl,
                                                    out.get(pl.dim), p.shape[pl.dim], False)
            sizes[pl.dim] = size
            out[pl.dim] = idx
    return out


@torch.no_grad()
def init_local_params(module: nn.Module, margs, seed: int) -> None:
    """Fill every parameter's local shard with its slice of the layout-independent initial value."""
    for name, p in module.named_parameters():
        local = local_tensor(p)
        if local.numel() == 0:
            continue
        idx = local_index(p)
        fill_(local, name, margs, seed, tuple(p.shape), idx.get(0), idx.get(1))


def init_buffers(module: nn.Module, device) -> None:
    """Non-persistent buffers (RoPE tables) are computed, never loaded: recompute them after ``to_empty``."""
    args = module.args
    for _, moe in moe_layers(module):  # expert bias (loaded after this when resuming) and the load statistics
        moe.reset_buffers()
    if args.family != "gpt2":
        module.rope_cos, module.rope_sin = model_rope_tables(args, device)


# ------------------------------------------------------------------------------------------------ HF import
@torch.no_grad()
def load_hf_sharded(parts: list[nn.Module], hf_dir: str, margs) -> None:
    """Copy an HF folder's weights into the local shards. Llama / Qwen3(-MoE) safetensors are read tensor by tensor
    and row range by row range (no rank holds the model; of a stacked expert weight sharded on experts and/or rows,
    only this rank's experts and rows); other formats (GPT-2, .bin) are small and read whole."""
    check_hf_shape(margs, hf_dir)  # ValueError naming the differing keys
    lazy = margs.family == "llama" and (os.path.isfile(os.path.join(hf_dir, "model.safetensors")) or
                                        os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json")))
    if lazy:
        reader = LlamaSafetensorsReader(hf_dir, margs)
    else:
        _, full = import_hf(hf_dir)
    for part in parts:
        for name, p in part.named_parameters():
            local = local_tensor(p)
            if local.numel() == 0:
                continue
            idx, key = local_index(p), canonical_name(name)
            if is_adapter(key):  # LoRA adapters (llmforge/model/lora.py) keep their initial value
                continue
            if lazy:  # only this shard's experts / rows are read (reader.read applies every index)
                value = reader.read(key, idx)
            else:
                value = full[key]
                for dim, i in idx.items():
                    value = value.index_select(dim, i)
            local.copy_(value.view(local.shape))
