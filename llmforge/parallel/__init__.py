"""Parallelism applied from outside the model: ``resolve_dims`` validates the layout against the world size
before any collective, ``build_mesh`` makes the DeviceMesh, ``parallelize`` applies, in this order,
(float8 conversion →) PP split → EP → TP/SP → activation recomputation → compile → FSDP2 (ZeRO-2/3, HSDP) or DDP
(ZeRO-0/1).
"""
from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llmforge.core.config import ConfigError

from .parallel_model import ParallelModel  # noqa: E402  (re-exported: the engines import it from here)


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    pp_microbatches: int = 1       # pipeline microbatches per optimizer step (pp > 1)
    pp_stages_per_rank: int = 1    # 2 for the multi-stage schedules (interleaved, looped, zero-bubble V)
    ep: int = 1                    # expert-parallel ranks, taken from dp_shard (expert_parallel.py)
    cp: int = 1                    # context-parallel ranks: each sequence split over them (context_parallel.py)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def resolve_dims(pcfg, world_size: int, model_args=None, tcfg=None, recompute: str = "none",
                 seq_len: int | None = None) -> ParallelDims:
    """Fill dp_replicate=-1 from the world size and check every constraint; raise ConfigError otherwise.

    Pure arithmetic (no collective), so every rank fails the same way before the process group exists.
    dp_replicate=-1 takes what the world size leaves; with zero_stage 2/3 and dp_shard=1 the leftover goes to
    dp_shard instead (FSDP over a replicate-only mesh would save no memory, which is never what ZeRO-2/3 asks).
    """
    pp, tp, dps, rep, zero, cp = pcfg.pp, pcfg.tp, pcfg.dp_shard, pcfg.dp_replicate, pcfg.zero_stage, pcfg.cp
    cp_name, cp_size = ("*cp", f"*{cp}") if cp > 1 else ("", "")  # the messages name cp only when it is used
    if rep == -1:
        _check(world_size % (pp * tp * dps * cp) == 0,
               f"world size {world_size} is not divisible by parallel.pp*tp*dp_shard{cp_name} = {pp}*{tp}*{dps}"
               f"{cp_size}; launch a multiple of {pp * tp * dps * cp} processes")
        rep = world_size // (pp * tp * dps * cp)
        if zero in (2, 3) and dps == 1:
            rep, dps = 1, rep
    _check(pp * rep * dps * cp * tp == world_size,
           f"world size {world_size} != parallel.pp*dp_replicate*dp_shard{cp_name}*tp = {pp}*{rep}*{dps}{cp_size}*{tp} "
           f"= {pp * rep * dps * cp * tp}; change --nproc_per_node or the parallel.* sizes")
    _check(dps == 1 or zero in (2, 3), f"parallel.dp_shard={dps} shards parameters: use parallel.zero_stage=2 or 3")
    _check(not (zero == 1 and tp > 1), "parallel.zero_stage=1 with parallel.tp>1 is not supported "
           "(ZeroRedundancyOptimizer cannot broadcast DTensor shards): use zero_stage=2 or 3 with dp_shard")
    spr = 1
    if pp > 1:
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
        try:
            cls = get_schedule_class(pcfg.pp_schedule)
        except ValueError:
            raise ConfigError(f"parallel.pp_schedule={pcfg.pp_schedule!r} is unknown; choose one of GPipe, 1F1B, "
                              "Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV") from None
        _check(cls.__name__ not in ("PipelineScheduleSingle", "PipelineScheduleMulti"),
               f"parallel.pp_schedule={pcfg.pp_schedule!r} is an abstract base, not a schedule")
        spr = 1 if issubclass(cls, PipelineScheduleSingle) else 2
        _check(not (pcfg.compile and _zero_bubble(pcfg.pp_schedule)),
               f"parallel.compile=true does not work with the split input/weight backward of "
               f"{pcfg.pp_schedule}: use 1F1B/Interleaved1F1B or compile=false")
        _check(not (recompute == "selective" and _zero_bubble(pcfg.pp_schedule)),
               f"recompute=selective allows one backward per region, but {pcfg.pp_schedule} runs two (input, "
               f"then weight gradients): use recompute=full or another parallel.pp_schedule")
    if model_args is not None:
        a = model_args
        for name, value in (("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads), ("dim", a.dim),
                            ("ffn_dim", a.ffn_dim)):
            _check(value % tp == 0, f"parallel.tp={tp} does not divide model {name}={value}")
        _check(pp <= a.n_layers, f"parallel.pp={pp} exceeds model n_layers={a.n_layers}")
        # a q/k norm weight is shared by all heads: under TP each rank would see only its heads' gradient
        _check(not (a.qk_norm and tp > 1), "model.qk_norm with parallel.tp>1 is not supported yet (the per-head "
               "norms' gradients are not reduced over the tensor-parallel group): use data parallel, FSDP or PP")
        # multi-stage schedules may give the embedding or the output head a stage of its own
        _check(pp * spr <= a.n_layers + 2,
               f"parallel.pp={pp} with {pcfg.pp_schedule} needs {pp * spr} stages but the model has only "
               f"{a.n_layers} layers (+ embedding and output): lower parallel.pp or use 1F1B/GPipe")
        _check(not (pp > 1 and a.tie_embeddings),
               "parallel.pp>1 needs untied embeddings (model.tie_embeddings=false): the first and "
               "last stages would share a weight")
    check_ep(pcfg, dps, model_args)
    check_cp(pcfg, model_args, seq_len)
    _check(not (seq_len and tp > 1 and pcfg.sequence_parallel and seq_len % tp),
           f"data.seq_len={seq_len} is not divisible by parallel.tp={tp} (sequence parallelism splits the sequence): "
           f"change data.seq_len or set parallel.sequence_parallel=false")
    n_mb = 1
    if tcfg is not None:
        dp = rep * dps
        _check(tcfg.global_batch_size % dp == 0, f"train.global_batch_size={tcfg.global_batch_size} is not "
               f"divisible by the data-parallel size {dp}")
        if pp > 1:
            n_mb = pipeline_microbatches(pcfg, tcfg.global_batch_size // dp, tcfg.micro_batch_size, pp, spr)
    return ParallelDims(pp, rep, dps, tp, world_size, n_mb, spr, pcfg.ep, cp)


def check_cp(pcfg, model_args, seq_len: int | None) -> None:
    """parallel.cp splits each sequence into 2 x cp chunks (head-tail): seq_len must divide; MoE is refused."""
    cp, tp = pcfg.cp, pcfg.tp
    if cp == 1:
        return
    _check(not seq_len or seq_len % (2 * cp) == 0,
           f"data.seq_len={seq_len} is not divisible by 2 x parallel.cp = {2 * cp} (each sequence is cut into "
           f"2 x cp equal chunks): change data.seq_len or parallel.cp")
    _check(not (seq_len and tp > 1 and pcfg.sequence_parallel and (seq_len // cp) % tp),
           f"data.seq_len / parallel.cp = {seq_len // cp if seq_len else 0} tokens per rank is not divisible by "
           f"parallel.tp={tp} (sequence parallelism splits them): change data.seq_len or set "
           f"parallel.sequence_parallel=false")
    heads = model_args.n_heads // tp if model_args is not None else None
    _check(pcfg.cp_comm != "alltoall" or heads is None or heads % cp == 0,
           f"parallel.cp_comm=alltoall splits the {heads} attention heads per tp rank over parallel.cp={cp}: they "
           f"do not divide (use parallel.cp_comm=allgather)")
    _check(not (model_args is not None and model_args.moe.num_experts),
           f"parallel.cp={cp} with a mixture-of-experts model is not supported yet (routing statistics are per "
           f"sequence): use parallel.cp=1")
    _check(not (model_args is not None and model_args.family == "gpt2" and tp > 1),
           f"parallel.cp={cp} with a gpt2-family model under parallel.tp>1 is not supported (learned positions "
           f"are sharded by sequence there): use the llama family or parallel.tp=1")


def check_ep(pcfg, dp_shard: int, model_args) -> None:
    """parallel.ep takes its ranks from dp_shard: it needs an MoE model, FSDP, and to divide both dp_shard and
    the number of experts."""
    ep = pcfg.ep
    if ep == 1:
        return
    experts = model_args.moe.num_experts if model_args is not None else None
    _check(experts != 0, f"parallel.ep={ep} shards experts, but the model has none (set model.moe.num_experts)")
    _check(pcfg.zero_stage in (2, 3), f"parallel.ep={ep} takes its ranks from dp_shard: use parallel.zero_stage=2 "
                                      f"or 3 with parallel.dp_shard a multiple of {ep}")
    _check(dp_shard % ep == 0, f"parallel.ep={ep} does not divide parallel.dp_shard={dp_shard} (expert-parallel "
                               f"ranks are taken from the FSDP ranks)")
    _check(experts is None or experts % ep == 0, f"parallel.ep={ep} does not divide model.moe.num_experts={experts}")


def _zero_bubble(schedule: str) -> bool:
    return schedule.lower() in ("interleavedzerobubble", "zbvzerobubble", "dualpipev")


def pipeline_microbatches(pcfg, local_batch: int, micro_batch: int, pp: int, stages_per_rank: int) -> int:
    """Microbatches per step: parallel.pp_microbatches, else local batch / train.micro_batch_size, else the fewest
    that the schedule accepts (the smallest divisor of the local batch >= the number of stages)."""
    n_stages, name = pp * stages_per_rank, pcfg.pp_schedule
    where = "parallel.pp_microbatches" if pcfg.pp_microbatches else "local batch / train.micro_batch_size"
    if pcfg.pp_microbatches:
        n = pcfg.pp_microbatches
        _check(not micro_batch or micro_batch * n == local_batch,
               f"parallel.pp_microbatches={n} x train.micro_batch_size={micro_batch} != per-rank batch {local_batch}")
    elif micro_batch:
        _check(local_batch % micro_batch == 0, f"train.micro_batch_size={micro_batch} does not divide the "
                                               f"per-rank batch {local_batch}")
        n = local_batch // micro_batch
    else:
        n = next((d for d in range(n_stages, local_batch + 1) if local_batch % d == 0), local_batch)
    _check(local_batch % n == 0, f"{where}: {n} microbatches do not divide the per-rank batch {local_batch}")
    low = name.lower()
    if low in ("1f1b", "dualpipev"):
        need = pp if low == "1f1b" else n_stages
        _check(n >= need, f"parallel.pp_schedule={name} needs at least {need} microbatches, got {n} ({where}; "
                          f"per-rank batch {local_batch}): raise train.global_batch_size or set "
                          f"parallel.pp_microbatches")
    if low in ("interleaved1f1b", "interleavedzerobubble"):
        rounds = max(1, n // pp)
        _check(n % rounds == 0, f"parallel.pp_schedule={name} needs microbatches ({n}) to be a multiple of "
                                f"microbatches // pp = {rounds}: use a multiple of parallel.pp={pp}")
    return n


def build_mesh(dims: ParallelDims, device_type: str, timeout_s: float | None = None) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D world mesh (pp, dp_replicate, dp_shard, tp) and the flattened data-parallel mesh "dp".

    Sub-groups would otherwise get c10d's default timeout (30 min on gloo) instead of ``dist.timeout_s``."""
    # the layouts slice flattened dims ("dp_shard" under EP, "dp") from the root mesh, as torchtitan does
    warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
    if dims.cp > 1:  # FSDP shards over dp_shard x cp, replicas (DDP, TP all-reduce) span dp_replicate x cp
        names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp),
                                mesh_dim_names=names)
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "cp"]._flatten("dp_replicate_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        names = names + ("dp_shard_cp", "dp_replicate_cp", "dp_cp")
    elif dims.ep > 1:  # dp_shard = efsdp x ep: the experts' FSDP ranks times their expert-parallel ranks
        names = ("pp", "dp_replicate", "efsdp", "ep", "tp")
        mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep,
                                              dims.tp), mesh_dim_names=names)
        mesh["efsdp", "ep"]._flatten("dp_shard")
        dp_mesh = mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
    else:
        names = ("pp", "dp_replicate", "dp_shard", "tp")
        mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                                mesh_dim_names=names)
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    if timeout_s:
        from torch.distributed.distributed_c10d import _set_pg_timeout
        for group in {id(g): g for g in [*(mesh[n].get_group() for n in names),
                                                  mesh["dp_shard"].get_group(), dp_mesh.get_group()]}.values():
            _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
    return mesh, dp_mesh


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, cfg, device: torch.device,
                loss_fn=None) -> ParallelModel:
    """Apply the configured parallelism to ``model`` (already initialised identically on every rank)."""
    from .apply import parallelize_all  # one file per parallelism; apply.py composes them in order
    return parallelize_all(model, dims, mesh, cfg, device, loss_fn)
