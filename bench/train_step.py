"""Step time of llmforge's training step against a bare PyTorch loop (same model, batch, AdamW), same run.

llmforge side: ``train.build_model`` -> ``parallel.parallelize`` (world size 1) -> ``optim.build_optimizer`` and
per step what ``train.train`` does: lr schedule, ``train.forward_backward``, loss all-reduce over the dp group,
``train.clip_grad_norm``, finiteness check, ``opt.step``, ``zero_grad``.
Baseline: the same initial weights, ``model(x)`` -> cross-entropy -> backward -> clip_grad_norm_ -> AdamW.step.
The two loops alternate in blocks so machine noise hits both alike; medians of per-step times are compared.

CPU (default): preset tiny (vocab 4096), fp32 -> ``overhead_ratio`` = llmforge / bare (target <= 1.05).
GPU (when CUDA is available): presets gpt2-124m and llama-1b, bf16 autocast, SDPA (flash) attention, and
torch.compile (per block in llmforge, whole model in the baseline) -> tokens/s and MFU (metrics.device_peak_flops).

  python bench/train_step.py [--preset tiny] [--steps 30] [--seq-len 256] [--batch 8] [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, emit, median  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmforge.core.distributed import resolve_dtype  # noqa: E402
from llmforge.train.engines.native import build_model  # noqa: E402
from llmforge.core.loss import loss_fn  # noqa: E402
from llmforge.train.run_plan import batch_plan  # noqa: E402
from llmforge.core.config import load_config, RunConfig  # noqa: E402
from llmforge.core.distributed import init_distributed  # noqa: E402
from llmforge.train.metrics import device_peak_flops  # noqa: E402
from llmforge.model.presets import model_args  # noqa: E402
from llmforge.model.transformer import flops_per_token, num_params  # noqa: E402
from llmforge.core.optim import build_optimizer, lr_factor, set_lr  # noqa: E402
from llmforge.parallel import build_mesh, parallelize, resolve_dims  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_cfg(preset, seq_len, batch, compile_, dtype, vocab):
    over = [f"model.preset={preset}", f"data.seq_len={seq_len}", f"train.global_batch_size={batch}",
            f"parallel.compile={str(compile_).lower()}", f"train.dtype={dtype}", "train.warmup_steps=5",
            "train.steps=1000"]
    if vocab:
        over.append(f"model.vocab_size={vocab}")
    return load_config(RunConfig, None, over)


def bench_preset(preset, args, device, info):
    on_gpu = device.type == "cuda"
    cfg = make_cfg(preset, args.seq_len, args.batch, args.compile, "bf16" if on_gpu else "fp32",
                   args.vocab if preset.startswith("tiny") or args.vocab else 0)
    margs = model_args(cfg.model)
    if cfg.data.seq_len > margs.max_seq_len:
        raise SystemExit(f"--seq-len {cfg.data.seq_len} > max_seq_len {margs.max_seq_len} of {preset}")
    dims = resolve_dims(cfg.parallel, 1, margs, cfg.train)
    mesh, dp_mesh = build_mesh(dims, device.type)
    local, micro, accum = batch_plan(cfg, dims.dp)
    dtype = resolve_dtype(cfg.train.dtype, device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext

    # ---- llmforge
    model = build_model(margs, cfg.seed)
    bare_model = copy.deepcopy(model).to(device)  # identical initial weights for the baseline
    n_params, fpt = num_params(model), flops_per_token(model, cfg.data.seq_len)
    pm = parallelize(model, dims, mesh, cfg, device, loss_fn)
    opts = pm.zero1_optimizers or [build_optimizer([p], cfg.train, device) for p in pm.parts]
    group = dp_mesh.get_group()
    state = {"step": 0}

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, margs.vocab_size, (local, cfg.data.seq_len + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    def llmforge_step():
        lr = cfg.train.lr * lr_factor(state["step"], cfg.train)
        for o in opts:
            set_lr(o, lr)
        loss = pm.forward_backward(x, y, micro, accum, amp, loss_fn)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=group)
        gn = pm.clip_grad_norm(cfg.train.grad_clip)
        loss.item()
        if bool(torch.isfinite(loss).item() and torch.isfinite(gn).item()):
            for o in opts:
                o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        state["step"] += 1

    # ---- bare PyTorch
    t = cfg.train
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                 weight_decay=t.weight_decay, **({"fused": True} if on_gpu else {}))
    bare_fwd = torch.compile(bare_model) if args.compile else bare_model

    def bare_step():
        with amp():
            logits = bare_fwd(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), t.grad_clip)
        loss.item()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def timed(fn, n):
        out = []
        for _ in range(n):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
        return out

    warm = args.warmup + (3 if args.compile else 0)
    timed(llmforge_step, warm)
    timed(bare_step, warm)
    ours, base = [], []
    rounds = args.rounds or args.steps
    block = max(1, args.steps // rounds)
    for r in range(rounds):  # alternate (and alternate who goes first) to share the machine's noise fairly
        pair = (llmforge_step, ours), (bare_step, base)
        for fn, acc in (pair if r % 2 == 0 else pair[::-1]):
            acc.extend(timed(fn, block))
    tok = local * cfg.data.seq_len
    res = {"preset": preset, "params": n_params, "seq_len": cfg.data.seq_len, "batch": local,
           "dtype": str(dtype).replace("torch.", ""), "compile": bool(args.compile), "steps_each": len(ours),
           "llmforge_step_s": round(median(ours), 6), "bare_step_s": round(median(base), 6),
           "overhead_ratio": round(median(ours) / median(base), 4),
           "overhead_ratio_of_minima": round(min(ours) / min(base), 4),
           "llmforge_tokens_per_s": round(tok / median(ours), 1), "bare_tokens_per_s": round(tok / median(base), 1),
           "flops_per_token": fpt}
    peak = device_peak_flops(device)
    if peak:
        res["peak_tflops"] = peak / 1e12
        res["llmforge_mfu"] = round(tok / median(ours) * fpt / peak, 4)
        res["bare_mfu"] = round(tok / median(base) * fpt / peak, 4)
    if on_gpu:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", help="model preset (repeatable); default tiny on CPU, "
                                                     "gpt2-124m and llama-1b on GPU")
    p.add_argument("--steps", type=int, default=0, help="timed steps per side (default 30 CPU, 20 GPU)")
    p.add_argument("--seq-len", type=int, default=0, help="default 256 CPU, 1024 GPU")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default 8 CPU; GPU: 16 gpt2-124m, 4 llama-1b)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default on for GPU, off for CPU)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary for presets without one (tiny)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=0, help="alternating blocks per side (0: alternate every step)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: oversubscribed OpenMP threads on a shared box spin)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = init_distributed("auto", "auto")
    device = info.device
    on_gpu = device.type == "cuda"
    if args.compile is None:
        args.compile = on_gpu
    presets = args.preset or (["gpt2-124m", "llama-1b"] if on_gpu else ["tiny"])
    runs = []
    for preset in presets:
        a = argparse.Namespace(**vars(args))
        a.steps = args.steps or (20 if on_gpu else 24)
        a.seq_len = args.seq_len or (1024 if on_gpu else 256)
        a.batch = args.batch or ((4 if "1b" in preset else 16) if on_gpu else 8)
        a.vocab = args.vocab if preset.startswith("tiny") else 0
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
        r = bench_preset(preset, a, device, info)
        print(f"{preset}: llmforge {r['llmforge_step_s'] * 1e3:.2f} ms/step vs bare {r['bare_step_s'] * 1e3:.2f} ms "
              f"-> overhead x{r['overhead_ratio']:.3f}; {r['llmforge_tokens_per_s']:.0f} tok/s"
              + (f", MFU {r['llmforge_mfu']:.1%}" if "llmforge_mfu" in r else ""), flush=True)
        runs.append(r)
        if on_gpu:  # the preset's model and optimizers went out of scope with bench_preset
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    result = {"device": device_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "runs": runs, "overhead_ratio_max": max(r["overhead_ratio"] for r in runs), "target_overhead": 1.05}
    if dist.is_initialized():
        dist.destroy_process_group()
    emit("train_step", result)


if __name__ == "__main__":
    main()
