"""Parallelism applied from outside the model: ``resolve_dims`` validates the layout against the world size
before any collective, ``build_mesh`` makes the DeviceMesh, ``parallelize`` applies, in this order,
PP split → TP/SP → activation recomputation → compile → FSDP2 (ZeRO-2/3, HSDP) or DDP (ZeRO-0/1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llmforge.config import ConfigError


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def resolve_dims(pcfg, world_size: int, model_args=None, tcfg=None) -> ParallelDims:
    """Fill dp_replicate=-1 from the world size and check every constraint; raise ConfigError otherwise."""
    pp, tp, dps = pcfg.pp, pcfg.tp, pcfg.dp_shard
    rep = pcfg.dp_replicate
    if rep == -1:
        if world_size % (pp * tp * dps):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.pp*tp*dp_shard = "
                              f"{pp}*{tp}*{dps}; launch a multiple of {pp * tp * dps} processes")
        rep = world_size // (pp * tp * dps)
    if pp * rep * dps * tp != world_size:
        raise ConfigError(f"world size {world_size} != parallel.pp*dp_replicate*dp_shard*tp = {pp}*{rep}*{dps}*{tp} "
                          f"= {pp * rep * dps * tp}; change --nproc_per_node or the parallel.* sizes")
    if model_args is not None:
        a = model_args
        for name, value in (("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads), ("dim", a.dim),
                            ("ffn_dim", a.ffn_dim)):
            if value % tp:
                raise ConfigError(f"parallel.tp={tp} does not divide model {name}={value}")
        if pp > a.n_layers:
            raise ConfigError(f"parallel.pp={pp} exceeds model n_layers={a.n_layers}")
        if pp > 1 and a.tie_embeddings:
            raise ConfigError("parallel.pp>1 needs untied embeddings (model.tie_embeddings=false): the first and "
                              "last stages would share a weight")
    if tcfg is not None:
        dp = rep * dps
        if tcfg.global_batch_size % dp:
            raise ConfigError(f"train.global_batch_size={tcfg.global_batch_size} is not divisible by the "
                              f"data-parallel size {dp}")
    return ParallelDims(pp, rep, dps, tp, world_size)


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D world mesh (pp, dp_replicate, dp_shard, tp) and the flattened data-parallel mesh "dp"."""
    names = ("pp", "dp_replicate", "dp_shard", "tp")
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=names)
    return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")


@dataclass
class ParallelModel:
    """What the training loop drives: one module per local pipeline stage (one, without PP)."""
    parts: list[nn.Module]
    schedule: object = None          # torch.distributed.pipelining schedule when pp > 1
    is_first: bool = True            # this rank feeds token ids (first pipeline stage)
    is_last: bool = True             # this rank computes the loss (last pipeline stage)
    ddp: bool = False                # gradients synchronised by DDP (no_sync during accumulation)
    extras: dict = field(default_factory=dict)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, cfg, device: torch.device, loss_fn=None) -> ParallelModel:
    """Apply the configured parallelism to ``model`` (already initialised identically on every rank)."""
    p = cfg.parallel
    if dims.pp > 1 or dims.tp > 1 or p.zero_stage in (1, 2, 3) or cfg.recompute != "none" or p.compile:
        from . import apply  # the full composition (TP, PP, FSDP2, recompute, compile)
        return apply.parallelize_all(model, dims, mesh, cfg, device, loss_fn)
    model.to(device)
    if dims.dp_replicate > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, process_group=mesh["dp_replicate"].get_group(),
                    device_ids=[device.index] if device.type == "cuda" else None)
        return ParallelModel([model], ddp=True)
    return ParallelModel([model])
