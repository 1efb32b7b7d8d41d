"""GPU training throughput: gpt2-124m, llama-1b and llama-8b with FSDP (ZeRO-3) over all local GPUs, bf16, torch.compile
off and on -> tokens/s/GPU, MFU and peak memory (torch.cuda.max_memory_allocated), next to what the dry run
predicts for the same layout (``llmforge.dryrun``: the memory model checked against the GPU).

Each configuration runs under ``torchrun --nproc_per_node=<GPUs>`` (this script relaunches itself with --worker),
through the trainer's own path: ``build_parallel_model`` (meta init, FSDP2), AdamW, ``ParallelModel.forward_backward``
with the chunked loss, gradient clipping; random token batches (no data files needed). Times are the median of
the timed steps after warm-up.

  python bench/train_step_gpu.py [--presets gpt2-124m,llama-1b,llama-8b] [--seq-len 2048] [--micro 1]
                                 [--steps 20] [--warmup 5] [--compile off,on] [--float8 off,on]
Without CUDA GPUs it stops with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, device_name, emit, median  # noqa: E402

PRESET_CONFIGS = {"gpt2-124m": "configs/train/gpt2-124m.yaml", "llama-1b": "configs/train/llama-1b.yaml",
                  "llama-8b": "configs/train/llama-8b.yaml"}


def layout_overrides(preset: str, n_gpus: int, seq_len: int, micro: int, compile_: bool, extra=()) -> list[str]:
    return [f"model.preset={preset}", f"data.seq_len={seq_len}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * n_gpus}", "train.dtype=bf16", "parallel.zero_stage=3",
            f"parallel.dp_shard={n_gpus}", "parallel.dp_replicate=1", "parallel.tp=1", "parallel.pp=1",
            f"parallel.compile={'true' if compile_ else 'false'}", "train.warmup_steps=2", *extra]


def worker(a) -> int:
    """One configuration on every local GPU (launched by torchrun)."""
    import torch
    import torch.distributed as dist
    from llmforge.core.config import RunConfig, load_config
    from llmforge.core.distributed import init_distributed
    from llmforge.train.engines.native import autocast_for
    from llmforge.core.loss import loss_fn
    from llmforge.train.metrics import device_peak_flops
    from llmforge.model.presets import model_args
    from llmforge.model.transformer import flops_per_token, num_params
    from llmforge.core.optim import build_optimizer
    from llmforge.parallel import build_mesh, resolve_dims
    from llmforge.parallel.build import build_parallel_model, meta_model
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(RunConfig, os.path.join(ROOT, PRESET_CONFIGS[a.preset]),
                      layout_overrides(a.preset, world, a.seq_len, a.micro, a.compile == "on", a.overrides))
    info = init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    device = info.device
    margs = model_args(cfg.model)
    dims = resolve_dims(cfg.parallel, world, margs, cfg.train, cfg.recompute, cfg.data.seq_len)
    mesh, dp_mesh = build_mesh(dims, device.type)
    pm = build_parallel_model(margs, dims, mesh, cfg, device, loss_fn)
    opts = [build_optimizer([p], cfg.train, device) for p in pm.parts]
    amp = autocast_for(cfg, device)
    g = torch.Generator(device=device).manual_seed(info.rank)
    times = []
    for step in range(a.warmup + a.steps):
        batch = torch.randint(0, margs.vocab_size, (a.micro, a.seq_len + 1), device=device, generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        pm.forward_backward(batch[:, :-1], batch[:, 1:], a.micro, 1, amp, loss_fn)
        pm.clip_grad_norm(cfg.train.grad_clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
        if step == 0:
            torch.cuda.reset_peak_memory_stats()  # first step allocates the optimizer state: measured from step 2
    peak = torch.tensor([torch.cuda.max_memory_allocated()], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    meta = meta_model(margs)
    fpt = flops_per_token(meta, a.seq_len)
    tps = a.micro * a.seq_len / median(times)  # per GPU: each rank runs its own micro batch
    peak_flops = device_peak_flops(device)
    if info.rank == 0:
        out = {"preset": a.preset, "compile": a.compile == "on", "gpus": world, "seq_len": a.seq_len,
               "micro_batch": a.micro, "params": num_params(meta), "step_seconds": median(times),
               "tokens_per_sec_per_gpu": tps, "mfu": (fpt * tps / peak_flops) if peak_flops else None,
               "peak_memory_bytes": int(peak.item())}
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()
    return 0


def predicted_peak(preset: str, n_gpus: int, seq_len: int, micro: int, compile_: bool, gpu: str) -> int | None:
    from llmforge.core.config import RunConfig, load_config
    from llmforge.dryrun import run
    cfg = load_config(RunConfig, os.path.join(ROOT, PRESET_CONFIGS[preset]),
                      layout_overrides(preset, n_gpus, seq_len, micro, compile_))
    return run(cfg, n_gpus, gpu, log=lambda *x: None)["bytes_per_rank_max"]


def gpu_key() -> str:
    import torch
    name = torch.cuda.get_device_name(0).lower()
    return next((k for k in ("b200", "h200", "h100", "a100") if k in name), "h100")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt2-124m,llama-1b,llama-8b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default="off,on", help="off, on or off,on")
    ap.add_argument("--float8", default="off,on", help="off, on or off,on: train.float8 (torchao) rows")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every configuration")
    a = ap.parse_intermixed_args()
    if a.worker:
        return worker(a)
    import torch
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("error: bench/train_step_gpu.py needs CUDA GPUs (torch.cuda.is_available() is False); on CPU use "
              "bench/train_step.py", file=sys.stderr)
        return 2
    n = torch.cuda.device_count()
    rows = []
    for preset, comp, f8 in [(p, c, f) for p in a.presets.split(",") for c in a.compile.split(",")
                             for f in a.float8.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), "--worker", "--preset", preset, "--compile", comp, "--out", out,
               "--seq-len", str(a.seq_len), "--micro", str(a.micro), "--steps", str(a.steps),
               "--warmup", str(a.warmup), *a.overrides, *(["train.float8=true"] if f8 == "on" else [])]
        rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).returncode
        if rc != 0 or not os.path.getsize(out):
            rows.append({"preset": preset, "compile": comp == "on", "float8": f8 == "on",
                         "error": f"exit status {rc}"})
            continue
        row = {**json.load(open(out)), "float8": f8 == "on"}
        os.unlink(out)
        try:
            row["dryrun_peak_bytes"] = predicted_peak(preset, n, a.seq_len, a.micro, comp == "on", gpu_key())
            row["measured_vs_dryrun_peak"] = round(row["peak_memory_bytes"] / row["dryrun_peak_bytes"], 3)
        except Exception as e:  # noqa: BLE001 - the measurement stands without the prediction
            row["dryrun_error"] = str(e)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    emit("train_step_gpu", {"device": device_name(), "gpus": n, "configs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
