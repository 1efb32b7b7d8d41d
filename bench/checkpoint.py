"""Checkpoint cost with ``llmforge.checkpoint.Checkpointer`` (DCP, atomic rename, COMPLETE marker, keep-K).

1. save / load seconds of model + AdamW state for a small model (median of --reps), and bytes on disk; the
   baseline in the same run is a plain ``torch.save`` / ``torch.load`` of the same state dicts (one file,
   no atomic protocol) -> ``save_ratio_vs_torch_save``.
2. training time blocked by checkpointing: the same --steps training steps with no saves (baseline), with a
   sync save every --interval steps, and with ``checkpoint.async_save`` (DCP async_save in a background
   thread); blocked = wall - wall(no saves) -> ``async_blocked_ratio`` = async blocked / sync blocked.

  python bench/checkpoint.py [--dim 256 --layers 4 --vocab 8192] [--steps 24 --interval 6] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, emit, median  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmforge.checkpoint import Checkpointer  # noqa: E402
from llmforge.config import RunConfig, load_config  # noqa: E402
from llmforge.distributed import init_distributed  # noqa: E402
from llmforge.model.blocks import ModelArgs  # noqa: E402
from llmforge.model.transformer import Transformer, num_params  # noqa: E402
from llmforge.optim import build_optimizer  # noqa: E402


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default="", help="where to write (default: a temp dir; put it on the real disk)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = init_distributed("auto", "auto")
    device = info.device
    cfg = load_config(RunConfig, None, [])
    margs = ModelArgs(family="llama", dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64),
                      n_kv_heads=max(1, args.dim // 64), ffn_dim=4 * args.dim, vocab_size=args.vocab,
                      max_seq_len=max(512, args.seq_len))
    torch.manual_seed(0)
    model = Transformer(margs).to(device)
    opt = build_optimizer([model], cfg.train, device)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)

    def step():
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # optimizer state exists from here on
    root = tempfile.mkdtemp(prefix="llmforge-bench-ckpt-", dir=args.dir or None)
    try:
        # ---- 1. save / load
        ck = Checkpointer(os.path.join(root, "ckpt"), keep=1, async_save=False, rank=0)
        saves, loads, tsaves, tloads = [], [], [], []
        for r in range(args.reps):
            t0 = time.perf_counter()
            ck.save(r + 1, [model], [opt], {"step": r + 1, "samples": 0})
            saves.append(time.perf_counter() - t0)
            path = os.path.join(root, "ckpt", f"step_{r + 1:08d}")
            t0 = time.perf_counter()
            ck.load(path, [model], [opt])
            loads.append(time.perf_counter() - t0)
            # baseline: plain torch.save / torch.load of the same state (no sharding, no atomic protocol)
            tp = os.path.join(root, f"plain-{r}.pt")
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tp)
            tsaves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sd = torch.load(tp, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])
            tloads.append(time.perf_counter() - t0)
        ckpt_bytes = dir_bytes(path)
        plain_bytes = os.path.getsize(tp)

        # ---- 2. blocked training time: none / sync / async
        def run(mode):
            d = os.path.join(root, f"run-{mode}")
            c = Checkpointer(d, keep=2, async_save=(mode == "async"), rank=0)
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                step()
                if mode != "none" and s % args.interval == 0:
                    c.save(s, [model], [opt], {"step": s, "samples": 0})
            c.wait()
            wall = time.perf_counter() - t0
            shutil.rmtree(d, ignore_errors=True)
            return wall

        walls = {"none": [], "sync": [], "async": []}
        for r in range(args.reps):  # interleave the modes so machine noise hits each alike
            for mode in (("none", "sync", "async") if r % 2 == 0 else ("async", "sync", "none")):
                walls[mode].append(run(mode))
        w = {k: median(v) for k, v in walls.items()}
        n_saves = args.steps // args.interval
        sync_blocked, async_blocked = max(w["sync"] - w["none"], 1e-9), max(w["async"] - w["none"], 0.0)
        result = {
            "device": device_name(), "torch": torch.__version__, "params": num_params(model),
            "checkpoint_bytes": ckpt_bytes, "plain_torch_save_bytes": plain_bytes,
            "save_s": round(median(saves), 4), "load_s": round(median(loads), 4),
            "torch_save_s": round(median(tsaves), 4), "torch_load_s": round(median(tloads), 4),
            "save_ratio_vs_torch_save": round(median(saves) / median(tsaves), 3),
            "load_ratio_vs_torch_load": round(median(loads) / median(tloads), 3),
            "save_MBps": round(ckpt_bytes / median(saves) / 1e6, 1),
            "train_steps": args.steps, "saves_per_run": n_saves,
            "wall_no_save_s": round(w["none"], 3), "wall_sync_s": round(w["sync"], 3), "wall_async_s": round(w["async"], 3),
            "sync_blocked_per_save_s": round(sync_blocked / n_saves, 4),
            "async_blocked_per_save_s": round(async_blocked / n_saves, 4),
            "async_blocked_ratio": round(async_blocked / sync_blocked, 3),
        }
        print(f"save {result['save_s']:.3f}s load {result['load_s']:.3f}s ({ckpt_bytes / 1e6:.1f} MB; torch.save "
              f"{result['torch_save_s']:.3f}s) | blocked per save: sync {result['sync_blocked_per_save_s']:.3f}s, "
              f"async {result['async_blocked_per_save_s']:.3f}s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    emit("checkpoint", result)


if __name__ == "__main__":
    main()
