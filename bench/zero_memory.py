"""Per-rank parameter / gradient / optimizer-state bytes for ZeRO-0/1/2/3 on 2 and 4 processes (CPU, gloo),
against the ideal total/N, using the real ``llmforge.parallel.parallelize`` with a ``RunConfig``.

For each (N, stage) N processes are forked (gloo over localhost); each builds the same model, parallelizes it,
runs one training step (``train.forward_backward`` + ``train.clip_grad_norm`` + optimizer step) and counts the
bytes it holds locally:
  params     local parameter storage (DTensor shards count their local part)
  grads      local gradient storage after the step's backward (before zero_grad)
  optim      optimizer state (AdamW exp_avg/exp_avg_sq/step; ZeRO-1: the rank's ZeroRedundancyOptimizer shard)
  unsharded_after_forward  parameters held gathered between forward and backward (FSDP2: ZeRO-2 keeps them,
             ZeRO-3 reshards them); for ZeRO-0/1 the full replica.
The baseline is the unsharded total (ZeRO-0 on one rank); ``*_vs_ideal`` = max over ranks / (total / N), so
1.0 is perfect sharding and N means fully replicated.

  python bench/zero_memory.py [--worlds 2 4] [--stages 0 1 2 3] [--dim 128 --layers 4 --vocab 4096]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, emit  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _unsharded_after_forward(parts) -> int | None:
    """Bytes of parameters FSDP2 holds unsharded right now (None when no part is FSDP-managed)."""
    from torch.distributed.fsdp import FSDPModule
    total, seen = 0, False
    for part in parts:
        for m in part.modules():
            if not isinstance(m, FSDPModule):
                continue
            seen = True
            group = m._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            unsharded = group.is_unsharded
            if unsharded:
                total += sum(fp.sharded_param.numel() * (fp.param_dtype or fp.sharded_param.dtype).itemsize
                             for fp in group.fsdp_params)
    return total if seen else None


def _worker(rank, world, port, stage, margs_kw, batch, seq, q):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        import torch
        torch.set_num_threads(1)
        from llmforge.train.engines.native import build_model
        from llmforge.core.loss import loss_fn
        from llmforge.train.run_plan import batch_plan
        from llmforge.core.config import RunConfig, load_config
        from llmforge.core.distributed import init_distributed
        from llmforge.model.blocks import ModelArgs
        from llmforge.core.optim import build_optimizer
        from llmforge.parallel import build_mesh, parallelize, resolve_dims
        from llmforge.parallel.data_parallel import local_optimizer

        cfg = load_config(RunConfig, None, [f"parallel.zero_stage={stage}", f"train.global_batch_size={batch}",
                                            f"data.seq_len={seq}", "train.dtype=fp32"])
        margs = ModelArgs(**margs_kw)
        dims = resolve_dims(cfg.parallel, world, margs, cfg.train)
        info = init_distributed("cpu", "gloo", 120)
        mesh, dp_mesh = build_mesh(dims, "cpu")
        model = build_model(margs, cfg.seed)
        pm = parallelize(model, dims, mesh, cfg, info.device, loss_fn)
        opts = pm.zero1_optimizers or [build_optimizer([p], cfg.train, info.device) for p in pm.parts]
        local, micro, accum = batch_plan(cfg, dims.dp)
        g = torch.Generator().manual_seed(rank)
        data = torch.randint(0, margs.vocab_size, (local, seq + 1), generator=g)
        params = {id(p): p for part in pm.parts for p in part.parameters()}
        param_bytes = sum(_local_bytes(p) for p in params.values())
        # one forward, to see what stays gathered between forward and backward
        model0 = pm.parts[0]
        if pm.set_sync is not None:
            pm.set_sync(True)
        out = model0(data[:micro, :-1])
        held = _unsharded_after_forward(pm.parts)
        loss = loss_fn(out, data[:micro, 1:])
        loss.backward()
        for o in opts:
            o.zero_grad(set_to_none=True)
        # one real step
        pm.forward_backward(data[:, :-1], data[:, 1:], micro, accum, __import__("contextlib").nullcontext, loss_fn)
        pm.finish_grads()
        pm.clip_grad_norm(1.0)
        grad_bytes = sum(_local_bytes(p.grad) for p in params.values() if p.grad is not None)
        for o in opts:
            o.step()
        optim_bytes = 0
        for o in opts:
            for st in local_optimizer(o).state.values():
                optim_bytes += sum(_local_bytes(v) for v in st.values() if isinstance(v, torch.Tensor))
        if held is None:
            held = param_bytes
        q.put({"rank": rank, "params": param_bytes, "grads": grad_bytes, "optim": optim_bytes,
               "unsharded_after_forward": held})
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent, never hang it
        q.put({"rank": rank, "error": traceback.format_exc().strip().splitlines()[-1]})


def measure(world, stage, margs_kw, batch, seq, timeout=300):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, stage, margs_kw, batch, seq, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows, deadline = [], time.time() + timeout
    while len(rows) < world and time.time() < deadline:
        try:
            rows.append(q.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    margs_kw = dict(family="llama", dim=a.dim, n_layers=a.layers, n_heads=4, n_kv_heads=4, ffn_dim=4 * a.dim,
                    vocab_size=a.vocab, max_seq_len=max(64, a.seq_len))
    # baseline: the unsharded footprint, one process (ZeRO-0)
    base = measure(1, 0, margs_kw, a.batch, a.seq_len)
    if not base or "error" in base[0]:
        raise SystemExit(f"baseline failed: {base}")
    total = base[0]
    print(f"unsharded (1 process): params {total['params']:,} B, grads {total['grads']:,} B, "
          f"optim {total['optim']:,} B", flush=True)
    runs = []
    for world in a.worlds:
        for stage in a.stages:
            t0 = time.perf_counter()
            rows = measure(world, stage, margs_kw, a.batch, a.seq_len)
            errs = [r for r in rows if "error" in r]
            rec = {"world": world, "zero_stage": stage, "seconds": round(time.perf_counter() - t0, 1)}
            if errs or len(rows) < world:
                rec["error"] = errs[0]["error"] if errs else f"only {len(rows)}/{world} ranks reported"
                print(f"N={world} ZeRO-{stage}: FAILED {rec['error']}", flush=True)
                runs.append(rec)
                continue
            for k in ("params", "grads", "optim", "unsharded_after_forward"):
                mx = max(r[k] for r in rows)
                rec[f"{k}_per_rank_max"] = mx
                rec[f"{k}_per_rank"] = [r[k] for r in rows]
                rec[f"{k}_vs_ideal"] = round(mx / (total[k] / world), 3) if total[k] else None
            per_rank_total = max(r["params"] + r["grads"] + r["optim"] for r in rows)
            all_total = total["params"] + total["grads"] + total["optim"]
            rec["state_per_rank_max"] = per_rank_total
            rec["state_vs_unsharded"] = round(per_rank_total / all_total, 3)
            rec["state_vs_ideal"] = round(per_rank_total / (all_total / world), 3)
            print(f"N={world} ZeRO-{stage}: params x{rec['params_vs_ideal']} grads x{rec['grads_vs_ideal']} "
                  f"optim x{rec['optim_vs_ideal']} of ideal 1/N; per-rank state {rec['state_vs_unsharded']:.2f} "
                  f"of unsharded ({rec['seconds']} s)", flush=True)
            runs.append(rec)
    emit("zero_memory", {"device": device_name(), "backend": "gloo", "launcher": "fork",
                         "model": margs_kw, "unsharded": {k: total[k] for k in ("params", "grads", "optim")},
                         "runs": runs})


if __name__ == "__main__":
    main()
