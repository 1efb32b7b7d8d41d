"""Dry run of a layout at any scale on one CPU: ``python -m llmforge.dryrun CONFIG [k=v ...] --world-size N
[--gpu h100|h200|a100|b200]``.

It walks the real setup path of ``llmforge.train`` — config validation, ``resolve_dims``, the device mesh,
``build_parallel_model`` (meta model → PP stages → TP → recompute → compile → FSDP), the optimizer and the
checkpoint state dicts — on PyTorch's fake process group (collectives return at once) with meta tensors (no
memory), once per pipeline stage (ranks of one stage hold the same shapes; the first coordinate of every other
mesh dim holds the largest of uneven shards). Per rank it reports parameter, gradient, optimizer, activation and
transient bytes, their sum (the peak), the communication volume per step per mesh dim and whether that fits
the GPU. The last line is ``DRYRUN {json}``. See llmforge/parallel/memory.py for what each number counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

GPUS = {  # memory visible to CUDA, bytes (nvidia-smi totals)
    "a100": 81920 * 2 ** 20, "h100": 81559 * 2 ** 20, "h200": 143771 * 2 ** 20, "b200": 183359 * 2 ** 20}
RESERVED = 3 * 2 ** 30  # CUDA context, NCCL buffers, allocator fragmentation
GIB = 2 ** 30


def _resolve(cfg, world: int):
    """The model shape, layout and batch plan through ``llmforge.train``'s own resolution
    (``run_plan.resolve_shape_and_batch``); the data need not exist (then the preset or model.vocab_size decides)."""
    from llmforge.core.config import ConfigError
    from llmforge.train.engines.native import NativeEngine
    from llmforge.train.run_plan import resolve_shape_and_batch, with_expanded_paths
    cfg = with_expanded_paths(cfg)  # as llmforge.train reads the paths
    if cfg.engine != "native":
        raise ConfigError(f"engine={cfg.engine}: the dry run models the native engine (engine=native)")
    try:
        from llmforge.data.streams import find_tokenizer
        tok = find_tokenizer(cfg.data.paths)
    except Exception:  # noqa: BLE001 - data need not exist for a dry run
        tok = None
    try:
        margs, dims, _, local, micro, accum = resolve_shape_and_batch(cfg, world, NativeEngine.resolve_layout, tok)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{e} (a dry run without data needs model.vocab_size=N)") from None
    if dims.pp > 1:
        return margs, dims, local // dims.pp_microbatches, 1
    return margs, dims, micro, accum


def probe_parts(margs, dims, mesh, cfg, pp_rank: int, dtype):
    """This rank's stages on meta with TP applied (no FSDP: it refuses forward on meta; it does not change
    activations), cast to the compute dtype, for the activation measurement."""
    from llmforge.parallel import pipeline
    from llmforge.parallel.build import meta_model
    from llmforge.parallel.tensor_parallel import apply_tp, sequence_parallel_stage_io
    model = meta_model(margs)
    n_stages = dims.pp * dims.pp_stages_per_rank
    if dims.pp > 1:
        ids, parts = pipeline.split_model(model, dims, cfg.parallel.pp_schedule, pp_rank)
    else:
        ids, parts = [0], [model]
    firsts, lasts = [i == 0 for i in ids], [i == n_stages - 1 for i in ids]
    for part, first, last in zip(parts, firsts, lasts):
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], cfg.parallel.sequence_parallel, cfg.parallel.loss_parallel)
            if dims.pp > 1 and cfg.parallel.sequence_parallel:
                sequence_parallel_stage_io(part, mesh["tp"], first, last)
        part.to(dtype)
    return ids, parts, firsts, lasts


def simulate_rank(cfg, margs, dims, rank: int, micro: int, accum: int, device_type: str = "meta",
                  flash: bool = True):
    """Run the setup path as ``rank`` (the process group must be initialised) and account its memory."""
    import torch
    from llmforge.checkpoint.checkpointer import _model_sd, _optim_sd
    from llmforge.core.distributed import resolve_dtype
    from llmforge.core.loss import loss_fn
    from llmforge.core.optim import build_optimizer
    from llmforge.parallel import build_mesh
    from llmforge.parallel.build import build_parallel_model
    from llmforge.parallel import memory as M
    device = torch.device(device_type)
    mesh, _ = build_mesh(dims, "cpu")
    pm = build_parallel_model(margs, dims, mesh, cfg, device, loss_fn)
    optimizers = pm.zero1_optimizers or [build_optimizer([p], cfg.train, device) for p in pm.parts]
    ckpt = sum(M.local_bytes(v) for v in _model_sd(pm.parts).values() if isinstance(v, torch.Tensor))
    ckpt += sum(M.local_bytes(v) for v in _optim_sd(pm.parts, optimizers).values() if isinstance(v, torch.Tensor))
    n, pb, gb, ob = M.state_bytes(pm.parts, optimizers, fsdp=cfg.parallel.zero_stage in (2, 3))
    pp_rank = mesh["pp"].get_local_rank()
    dtype = resolve_dtype(cfg.train.dtype, torch.device("cuda" if device_type == "meta" else device_type))
    ids, parts, firsts, lasts = probe_parts(margs, dims, mesh, cfg, pp_rank, dtype)
    seq = cfg.data.seq_len // dims.cp  # the tokens this rank holds (context parallelism: 1/cp of each sequence)
    measured = M.measure_activations(parts, firsts, lasts, micro, seq, dtype, loss_fn, flash)
    esize = torch.finfo(dtype).bits // 8
    cp_comm = M.add_context_parallel_kv(measured, dims, micro, cfg.data.seq_len, margs, esize, accum,
                                        cfg.parallel.cp_comm)
    act, recompute = M.activation_totals(measured, cfg, dims, pp_rank, micro, seq, margs.dim, esize)
    transient, comm = M.transient_and_comm(pm.parts, cfg, dims, micro, accum, seq, esize, margs, gb, ids, pp_rank)
    comm.update(cp_comm)
    return M.RankMemory(rank, ids, n, pb, gb, ob, act, transient + recompute, ckpt, comm), measured


def _simulate_fake(cfg, margs, dims, rank: int, micro: int, accum: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        return simulate_rank(cfg, margs, dims, rank, micro, accum)[0]
    finally:
        dist.destroy_process_group()


def _child_main(fn, args, send) -> None:
    import pickle
    try:
        out = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to the parent
        import traceback
        out = (False, (e, traceback.format_exc()) if _picklable(e) else (RuntimeError(str(e)), traceback.format_exc()))
    send.send_bytes(pickle.dumps(out))
    os._exit(0)


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked process: every simulated rank gets a fresh process-group/mesh state
    (DeviceMesh caches outlive ``destroy_process_group``). Exceptions come back as themselves. The fork is
    made by a forkserver (a fresh interpreter that imported this module once), never by the caller: a caller with
    threads (a test process, a notebook) would hand the child the locks they held at the fork."""
    import multiprocessing as mp
    import pickle
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["llmforge.dryrun"])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, args, send))
    proc.start()
    send.close()
    try:
        ok, value = pickle.loads(recv.recv_bytes())
    except EOFError:
        proc.join()
        raise RuntimeError(f"dry-run worker died (exit code {proc.exitcode})") from None
    proc.join()
    if not ok:
        if os.environ.get("LLMFORGE_DEBUG"):
            print(value[1], file=sys.stderr)
        raise value[0]
    return value


def _picklable(e) -> bool:
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:  # noqa: BLE001
        return False


def run(cfg, world: int, gpu: str, log=print) -> dict:
    from llmforge.model.transformer import num_params
    from llmforge.parallel.build import meta_model
    if cfg.train.dtype == "auto":  # what a GPU run resolves "auto" to
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="bf16"))  # a copy: cfg stays
    margs, dims, micro, accum = _resolve(cfg, world)
    meta = meta_model(margs)
    total, active = num_params(meta), num_params(meta, active=True)
    per_stage = world // dims.pp
    ranks = [_in_child(_simulate_fake, cfg, margs, dims, stage * per_stage, micro, accum)
             for stage in range(dims.pp)]
    cap = GPUS[gpu] - RESERVED
    worst = max(ranks, key=lambda m: m.peak_bytes)
    fits = worst.peak_bytes <= cap
    layout = (f"pp{dims.pp} x dp_replicate{dims.dp_replicate} x dp_shard{dims.dp_shard}"
              + (f" (ep{dims.ep})" if dims.ep > 1 else "") + (f" x cp{dims.cp}" if dims.cp > 1 else "")
              + f" x tp{dims.tp} "
              f"zero{cfg.parallel.zero_stage}" + (f" {cfg.parallel.pp_schedule}" if dims.pp > 1 else "")
              + (f" recompute={cfg.recompute}" if cfg.recompute != "none" else ""))
    if fits:
        reason = (f"fits: rank {worst.rank} peaks at {worst.peak_bytes / GIB:.1f} GiB of {cap / GIB:.1f} GiB usable "
                  f"on {gpu} ({(cap - worst.peak_bytes) / GIB:.1f} GiB spare)")
    else:
        comp, size = max(worst.components().items(), key=lambda kv: kv[1])
        reason = (f"does not fit: rank {worst.rank} (stage {worst.stages}) needs {worst.peak_bytes / GIB:.1f} GiB, "
                  f"{(worst.peak_bytes - cap) / GIB:.1f} GiB over the {cap / GIB:.1f} GiB usable on {gpu}; largest "
                  f"component: {comp} {size / GIB:.1f} GiB" + _hint(comp, cfg, dims))
    _table(ranks, log)
    experts = margs.moe.num_experts // dims.ep if margs.moe.num_experts else 0
    log(f"model {cfg.model.preset}: {total:,} parameters" + (f" ({active:,} active; {experts} of "
        f"{margs.moe.num_experts} experts per block on each rank)" if experts else "")
        + f" | {layout} | world {world} | micro batch {micro} x "
        f"seq {cfg.data.seq_len}, {accum if dims.pp == 1 else dims.pp_microbatches} micro batches per step | "
        f"{cfg.train.dtype}")
    log(reason)
    return {"world_size": world, "params_total": total, "params_active": active, "experts_per_rank": experts,
            "params_per_rank_max": max(m.params for m in ranks),
            "bytes_per_rank_max": worst.peak_bytes, "fits": fits, "layout": layout, "gpu": gpu,
            "usable_bytes": cap, "reason": reason,
            "ranks": [{"rank": m.rank, "stages": m.stages, "params": m.params, **{f"{k}_bytes": v for k, v in
                       m.components().items()}, "peak_bytes": m.peak_bytes, "checkpoint_bytes": m.checkpoint_bytes,
                       "comm_bytes_per_step": m.comm_bytes} for m in ranks]}


def _hint(component: str, cfg, dims) -> str:
    tries = [t for t, skip in (("recompute=full", cfg.recompute == "full"), ("a smaller train.micro_batch_size",
             cfg.train.micro_batch_size == 1), ("more tp/pp", False),
             ("parallel.cp (splits each sequence)", dims.cp > 1 and cfg.data.seq_len < 8192 * dims.cp)) if not skip]
    return {"activations": f" (try {', '.join(tries)})",
            "optimizer": " (shard it: parallel.zero_stage=3 with a larger dp_shard)",
            "params": " (shard more: larger dp_shard with zero_stage=3, or tp/pp)",
            "grads": " (zero_stage 2/3 shard gradients)",
            "transient": " (zero_stage=3 regathers per block; smaller blocks per FSDP unit)"}.get(component, "")


def _table(ranks, log) -> None:
    comm_dims = sorted({k for m in ranks for k in m.comm_bytes})
    head = ["rank", "stages", "params", "params GiB", "grads GiB", "optim GiB", "activ GiB", "transient GiB",
            "peak GiB", "ckpt GiB"] + [f"comm {d} GB/step" for d in comm_dims]
    rows = [[str(m.rank), ",".join(map(str, m.stages)), f"{m.params:,}"] +
            [f"{b / GIB:.2f}" for b in (m.param_bytes, m.grad_bytes, m.optim_bytes, m.activation_bytes,
                                        m.transient_bytes, m.peak_bytes, m.checkpoint_bytes)] +
            [f"{m.comm_bytes.get(d, 0) / 1e9:.2f}" for d in comm_dims] for m in ranks]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    log("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        log("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmforge.dryrun", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=8")
    ap.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs) to simulate")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU whose memory the layout must fit")
    a = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from llmforge.core.config import ConfigError, RunConfig, load_config
    if a.world_size < 1:
        print("error: --world-size must be >= 1", file=sys.stderr)
        return 2
    t = time.time()
    try:
        cfg = load_config(RunConfig, a.config, a.overrides)
        result = run(cfg, a.world_size, a.gpu)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LLMFORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - t, 1)
    print("DRYRUN " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
