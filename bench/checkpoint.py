"""Checkpoint cost with ``llmforge.checkpoint.checkpointer.Checkpointer`` (DCP, fsync, xxh3 COMPLETE marker, atomic rename, keep-K).

1. save / load seconds of model + AdamW state for a small model (median of --reps), and bytes on disk; the
   baseline in the same run, interleaved, is a plain ``torch.save`` / ``torch.load`` of the same state dicts (one
   file, no fsync, no checksums, no atomic protocol) -> ``save_throughput_vs_torch_save`` = torch.save s / save s
   (goal >= 0.5; ``save_ratio_vs_torch_save`` is its inverse). The save includes the checksums of the marker;
   ``checksum_s`` is their cost alone (xxh3 of every file, as ``load`` verifies it). Every timed write starts from
   a clean page cache (``os.sync()`` first, untimed): this machine throttles writers once ~300 MB are dirty, so
   without it each write would pay for the writeback of the one before.
2. training time blocked by checkpointing: the same --steps training steps with no saves (baseline), with a
   sync save every --interval steps, and with ``checkpoint.async_save`` (staged copy + background write), the
   last save --interval steps before the end. Blocked per save = time inside ``save()`` + the excess of every
   step that overlaps a background write over the same run's median step beside none (CPU/GIL contention, the
   optimizer step's wait for the staged copy) + the final ``wait()`` -> ``async_blocked_ratio`` = async / sync
   (medians over --reps; goal <= 0.1). ``*_wall`` is the same from wall-clock differences to the no-save run of the
   same repetition (the three run back to back, in alternating order): it holds the same cost, but also the
   noise of a shared machine, several tenths of a second per run here.

  python bench/checkpoint.py [--dim 256 --layers 4 --vocab 8192] [--steps 24 --interval 6] [--reps 5]
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

from llmforge.checkpoint.checkpointer import Checkpointer  # noqa: E402
from llmforge.checkpoint.integrity import _file_checksums  # noqa: E402
from llmforge.core.config import RunConfig, load_config  # noqa: E402
from llmforge.core.distributed import init_distributed  # noqa: E402
from llmforge.model.blocks import ModelArgs  # noqa: E402
from llmforge.model.transformer import Transformer, num_params  # noqa: E402
from llmforge.core.optim import build_optimizer  # noqa: E402


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def timed(fn) -> float:
    os.sync()  # untimed: every write starts from a clean page cache (see the module docstring)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def save_load(args, root, model, opt) -> dict:
    """Checkpointer.save / load vs torch.save / torch.load of the same state, interleaved."""
    ck = Checkpointer(os.path.join(root, "ckpt"), keep=1, async_save=False, rank=0)
    saves, loads, sums, tsaves, tloads = [], [], [], [], []
    for r in range(args.reps):
        path = os.path.join(root, "ckpt", f"step_{r + 1:08d}")
        saves.append(timed(lambda: ck.save(r + 1, [model], [opt], {"step": r + 1, "samples": 0})))
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        sums.append(timed(lambda: _file_checksums(files)))
        loads.append(timed(lambda: ck.load(path, [model], [opt])))
        # baseline: plain torch.save / torch.load of the same state (no sharding, no fsync, no atomic protocol)
        tp = os.path.join(root, f"plain-{r}.pt")
        tsaves.append(timed(lambda: torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tp)))

        def plain_load():
            sd = torch.load(tp, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])
        tloads.append(timed(plain_load))
        ckpt_bytes, plain_bytes = dir_bytes(path), os.path.getsize(tp)
        os.remove(tp)
    save, tsave = median(saves), median(tsaves)
    return {"checkpoint_bytes": ckpt_bytes, "plain_torch_save_bytes": plain_bytes,
            "save_s": round(save, 4), "checksum_s": round(median(sums), 4), "load_s": round(median(loads), 4),
            "torch_save_s": round(tsave, 4), "torch_load_s": round(median(tloads), 4),
            "save_s_range": [round(min(saves), 4), round(max(saves), 4)],
            "torch_save_s_range": [round(min(tsaves), 4), round(max(tsaves), 4)],
            "save_throughput_vs_torch_save": round(tsave / save, 3),
            "save_ratio_vs_torch_save": round(save / tsave, 3),
            "load_ratio_vs_torch_load": round(median(loads) / median(tloads), 3),
            "save_MBps": round(ckpt_bytes / save / 1e6, 1)}


def blocked(args, root, model, opt, step) -> dict:
    """Training with no saves, sync saves and async saves, the three back to back in each repetition. Blocked per
    save = the time inside ``save()`` + what the steps that overlap a background write take beyond the median
    step of the same run beside no write (contention for the CPU and the GIL, the wait of the optimizer step for
    the staged copy) + the final ``wait()``. The wall-clock difference to the no-save run is reported too
    (``*_wall``): it holds the same cost, but under a shared machine's noise of several tenths of a second."""
    def run(mode):
        d = os.path.join(root, f"run-{mode}")
        c = Checkpointer(d, keep=2, async_save=(mode == "async"), rank=0)
        os.sync()
        times, in_save, overlapped, t0 = [], 0.0, [], time.perf_counter()
        for s in range(1, args.steps + 1):
            busy = c.writing()
            t1 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t1)
            if busy:
                overlapped.append(len(times) - 1)
            if mode != "none" and s % args.interval == 0 and s < args.steps:
                t1 = time.perf_counter()
                c.save(s, [model], [opt], {"step": s, "samples": 0})
                in_save += time.perf_counter() - t1
        t1 = time.perf_counter()
        c.wait()
        final_wait = time.perf_counter() - t1
        wall = time.perf_counter() - t0
        shutil.rmtree(d, ignore_errors=True)
        return {"wall": wall, "times": times, "in_save": in_save, "overlapped": overlapped, "final_wait": final_wait}

    runs = {"none": [], "sync": [], "async": []}
    for r in range(args.reps):  # alternate the order so machine noise hits each alike
        for mode in (("none", "sync", "async") if r % 2 == 0 else ("async", "sync", "none")):
            runs[mode].append(run(mode))
    n_saves = (args.steps - 1) // args.interval

    def blocked_s(mode, r):
        got = runs[mode][r]  # the baseline step: this run's steps beside no write (nearest in time: same load)
        base = median([t for i, t in enumerate(got["times"]) if i not in got["overlapped"]])
        extra = sum(max(got["times"][i] - base, 0.0) for i in got["overlapped"])
        return (got["in_save"] + extra + got["final_wait"]) / n_saves

    per_save = {m: median([blocked_s(m, r) for r in range(args.reps)]) for m in ("sync", "async")}
    wall = {m: median([runs[m][r]["wall"] - runs["none"][r]["wall"] for r in range(args.reps)]) / n_saves
            for m in ("sync", "async")}
    return {"train_steps": args.steps, "saves_per_run": n_saves, "reps": args.reps,
            "step_s_no_save": round(median([median(x["times"]) for x in runs["none"]]), 4),
            **{f"wall_{m}_s": [round(x["wall"], 3) for x in runs[m]] for m in runs},
            "sync_blocked_per_save_s": round(per_save["sync"], 4),
            "async_blocked_per_save_s": round(per_save["async"], 4),
            "async_in_save_per_save_s": round(median([x["in_save"] for x in runs["async"]]) / n_saves, 4),
            "async_steps_overlapping_a_write": median([len(x["overlapped"]) for x in runs["async"]]),
            "async_blocked_ratio": round(per_save["async"] / per_save["sync"], 3),
            "sync_blocked_per_save_s_wall": round(wall["sync"], 4),
            "async_blocked_per_save_s_wall": round(wall["async"], 4),
            "async_blocked_ratio_wall": round(max(wall["async"], 0.0) / max(wall["sync"], 1e-9), 3)}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--reps", type=int, default=5)
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
        result = {"device": device_name(), "torch": torch.__version__, "params": num_params(model),
                  **save_load(args, root, model, opt), **blocked(args, root, model, opt, step)}
        print(f"save {result['save_s']:.3f}s (checksums {result['checksum_s']:.3f}s) load {result['load_s']:.3f}s "
              f"({result['checkpoint_bytes'] / 1e6:.1f} MB; torch.save {result['torch_save_s']:.3f}s: throughput x"
              f"{result['save_throughput_vs_torch_save']}) | blocked per save: sync "
              f"{result['sync_blocked_per_save_s']:.3f}s, async {result['async_blocked_per_save_s']:.3f}s (x"
              f"{result['async_blocked_ratio']})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    emit("checkpoint", result)


if __name__ == "__main__":
    main()
