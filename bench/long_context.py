"""Long-context training: document-masked attention against full causal attention, and per-rank memory at cp 1/2/4/8.

1. Attention forward + backward of one packed sequence of short documents (lengths drawn uniformly in
   ``--doc-min``..``--doc-max`` with a fixed seed; positions restart at 0 at each document, as
   ``llmforge.core.packing.batch_positions`` gives them), q/k/v (batch, heads, seq, head_dim) requiring grad:
   - ``doc``: ``CoreAttention()(q, k, v, TokenLayout(positions))`` (llmforge.model.attention: SDPA with a dense
     boolean mask on CPU and short CUDA sequences, a FlexAttention BlockMask on CUDA from ``FLEX_MIN_LEN``);
     the mask is built once before the timed region, as one forward builds it once for every layer (its build
     time is reported on its own, ``mask_build_ms``);
   - ``causal``: ``CoreAttention()(q, k, v, None)``, SDPA ``is_causal`` over the whole sequence (the baseline,
     what attention costs without document masking; it lets tokens see earlier documents);
   - ``per_doc``: the same exact result as ``doc`` by a loop of causal SDPA calls, one per document (the work
     a document mask needs, ``doc_work_fraction`` of the causal one, without a mask tensor).
   Each iteration runs the three in turn (interleaved, so machine noise hits all alike); medians and minima of
   the per-iteration times after ``--warmup`` untimed rounds. ``doc_vs_causal`` = doc time / causal time.
   Memory: on CUDA ``torch.cuda.max_memory_allocated`` during one forward + backward (mask built inside it)
   above what q/k/v hold before; on CPU the bytes of the tensors autograd saves for backward (each storage
   once: q, k, v, output, logsumexp and SDPA's float copy of the mask) plus the layout's cached boolean mask.
   CPU temporaries inside the kernels are not counted.
2. Per-rank memory at each ``--cp`` from the dry run's memory model (``llmforge.dryrun.run``, in process, silent):
   ``--dryrun-config`` at world size ``dp_shard x cp`` with ``parallel.cp=cp``; peak, activations and the cp
   communication bytes per step of rank 0, and peak(cp) / peak(cp 1). Modelled, not measured.

Ends with ``RESULT {json}`` (also saved under bench/results/long_context-<device>.json).

  python bench/long_context.py [--lengths 1024,2048,4096] [--heads 8] [--head-dim 64] [--iters 5] [--warmup 1]
                               [--cp 1,2,4,8] [--dryrun-config configs/train/llama-8b-128k.yaml] [--skip-dryrun]
GPU: python bench/long_context.py --lengths 4096,8192,16384,32768,65536
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, device_name, emit, median  # noqa: E402

import torch  # noqa: E402

from llmforge.model.attention import FLEX_MIN_LEN, CoreAttention, TokenLayout  # noqa: E402

GIB = 2 ** 30
VARIANTS = ("doc", "causal", "per_doc")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def draw_documents(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Document lengths in lo..hi (fixed seed) covering ``total`` tokens, the last one cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    docs, n = [], 0
    while n < total:
        d = min(int(torch.randint(lo, hi + 1, (1,), generator=gen)), total - n)
        docs.append(d)
        n += d
    return docs


def positions_of(docs: list[int], device) -> torch.Tensor:
    """(1, seq): the position of each token inside its document (0 at each start)."""
    return torch.cat([torch.arange(d) for d in docs])[None].to(device)


def make_fns(docs: list[int], positions: torch.Tensor):
    core = CoreAttention()

    def doc(q, k, v, layout=None):
        return core(q, k, v, layout if layout is not None else TokenLayout(positions))

    def causal(q, k, v, layout=None):
        return core(q, k, v, None)

    def per_doc(q, k, v, layout=None):
        outs, s = [], 0
        for d in docs:
            outs.append(core(q[:, :, s:s + d], k[:, :, s:s + d], v[:, :, s:s + d], None))
            s += d
        return torch.cat(outs, dim=2)
    return {"doc": doc, "causal": causal, "per_doc": per_doc}


def timed(fn, qkv, layout, device) -> float:
    """Seconds of one forward + backward of a scalar loss with respect to q, k, v."""
    sync(device)
    t0 = time.perf_counter()
    fn(*qkv, layout).float().square().mean().backward()
    sync(device)
    dt = time.perf_counter() - t0
    for t in qkv:
        t.grad = None
    return dt


def memory(fn, qkv, positions, device) -> int:
    """Bytes of one forward + backward (see the module docstring for what is counted), mask built inside."""
    layout = TokenLayout(positions)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*qkv, layout).float().square().mean().backward()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*qkv, layout)
        for m in layout.cache.values():  # the cached mask the layout keeps for every layer
            if isinstance(m, torch.Tensor):
                seen.setdefault(m.untyped_storage().data_ptr(), m.untyped_storage().nbytes())
        peak = sum(seen.values())
        out.float().square().mean().backward()
    for t in qkv:
        t.grad = None
    return int(peak)


def bench_length(seq: int, a, device, dtype) -> dict:
    """Times, memory and the exactness check for one sequence length."""
    docs = draw_documents(seq, a.doc_min, a.doc_max, a.seed)
    positions = positions_of(docs, device)
    torch.manual_seed(a.seed)
    qkv = [torch.randn(a.batch, a.heads, seq, a.head_dim, device=device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    if a.batch > 1:
        positions = positions.expand(a.batch, -1)
    fns = make_fns(docs, positions)
    sync(device)
    t0 = time.perf_counter()
    layout = TokenLayout(positions)
    mask = layout.local_mask(qkv[0])
    sync(device)
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = fns["per_doc"](*qkv).float()
        diff = float((fns["doc"](*qkv, layout).float() - ref).abs().max() / ref.abs().max())
    times = {k: [] for k in VARIANTS}
    for it in range(a.warmup + a.iters):
        for name in VARIANTS:
            dt = timed(fns[name], qkv, layout if name == "doc" else None, device)
            if it >= a.warmup:
                times[name].append(dt)
    mem = {k: memory(fns[k], qkv, positions, device) for k in VARIANTS}
    med = {k: median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    work = sum(d * (d + 1) for d in docs) / (seq * (seq + 1))
    return {
        "seq_len": seq, "documents": len(docs), "doc_work_fraction": round(work, 4),
        "mask": "dense bool" if isinstance(mask, torch.Tensor) else "flex BlockMask",
        "mask_build_ms": round(build_s * 1e3, 3), "doc_vs_per_doc_max_rel_diff": float(f"{diff:.3e}"),
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "min_ms": {k: round(v * 1e3, 3) for k, v in mins.items()},
        "memory_bytes": mem,
        "doc_vs_causal": round(med["doc"] / med["causal"], 3),
        "doc_vs_causal_minima": round(mins["doc"] / mins["causal"], 3),
        "per_doc_vs_causal_minima": round(mins["per_doc"] / mins["causal"], 3),
        "memory_doc_vs_causal": round(mem["doc"] / max(1, mem["causal"]), 3),
    }


def attention_table(rows: list[dict], mem_what: str) -> None:
    print(f"attention fwd+bwd, ms (median / min) and memory MiB ({mem_what}):")
    print(f"{'seq':>6} {'docs':>4} {'work':>5} {'doc':>17} {'causal':>17} {'per_doc':>17} {'doc/causal':>10} "
          f"{'(min)':>6} {'mask ms':>8} {'MiB doc':>8} {'causal':>7} {'per_doc':>7}")
    for r in rows:
        ms = [f"{r['median_ms'][k]:8.1f}/{r['min_ms'][k]:<8.1f}" for k in VARIANTS]
        mib = [f"{r['memory_bytes'][k] / 2**20:.1f}" for k in VARIANTS]
        print(f"{r['seq_len']:>6} {r['documents']:>4} {r['doc_work_fraction']:>5.3f} {ms[0]:>17} {ms[1]:>17} "
              f"{ms[2]:>17} {r['doc_vs_causal']:>10.3f} {r['doc_vs_causal_minima']:>6.3f} "
              f"{r['mask_build_ms']:>8.1f} {mib[0]:>8} {mib[1]:>7} {mib[2]:>7}", flush=True)


def cp_memory(a) -> dict:
    """Rank 0's modelled peak/activations/comm per cp from llmforge.dryrun.run (in process, log silenced)."""
    from llmforge.core.config import RunConfig, load_config
    from llmforge.dryrun import run
    config = os.path.join(ROOT, a.dryrun_config) if not os.path.isabs(a.dryrun_config) else a.dryrun_config
    rows = []
    for cp in a.cp:
        world = a.dp_shard * cp
        over = [f"parallel.cp={cp}", f"parallel.dp_shard={a.dp_shard}", *a.dryrun_overrides]
        t0 = time.perf_counter()
        res = run(load_config(RunConfig, config, over), world, a.gpu, log=lambda *_: None)
        r0 = res["ranks"][0]
        rows.append({"cp": cp, "world_size": world, "layout": res["layout"], "fits": res["fits"],
                     "peak_bytes": r0["peak_bytes"], "activations_bytes": r0["activations_bytes"],
                     "params_bytes": r0["params_bytes"], "transient_bytes": r0["transient_bytes"],
                     "comm_cp_bytes_per_step": r0["comm_bytes_per_step"].get("cp", 0),
                     "comm_bytes_per_step": r0["comm_bytes_per_step"], "seconds": round(time.perf_counter() - t0, 1)})
    base = next((r for r in rows if r["cp"] == 1), rows[0])
    for r in rows:
        r["peak_vs_cp1"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
        r["activations_vs_cp1"] = round(r["activations_bytes"] / base["activations_bytes"], 3)
    print(f"dry run (modelled) {a.dryrun_config} {' '.join(a.dryrun_overrides)} on {a.gpu}, rank 0:")
    print(f"{'cp':>3} {'world':>5} {'peak GiB':>9} {'activ GiB':>9} {'transient GiB':>13} {'cp comm GB/step':>15} "
          f"{'peak/cp1':>8} {'activ/cp1':>9} fits")
    for r in rows:
        print(f"{r['cp']:>3} {r['world_size']:>5} {r['peak_bytes'] / GIB:>9.2f} {r['activations_bytes'] / GIB:>9.2f} "
              f"{r['transient_bytes'] / GIB:>13.2f} {r['comm_cp_bytes_per_step'] / 1e9:>15.2f} "
              f"{r['peak_vs_cp1']:>8.3f} {r['activations_vs_cp1']:>9.3f} {r['fits']}", flush=True)
    return {"config": a.dryrun_config, "overrides": a.dryrun_overrides, "gpu": a.gpu, "dp_shard": a.dp_shard,
            "rows": rows}


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=ints, default=None, help="default: 1024,2048,4096 on CPU; "
                    "4096,8192,16384,32768,65536 on CUDA")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--doc-min", type=int, default=256)
    ap.add_argument("--doc-max", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    ap.add_argument("--cp", type=ints, default=[1, 2, 4, 8], help="context-parallel degrees for the dry run")
    ap.add_argument("--dp-shard", type=int, default=8, help="dry run world size = dp_shard x cp")
    ap.add_argument("--dryrun-config", default="configs/train/llama-8b-128k.yaml")
    ap.add_argument("--dryrun-overrides", nargs="*", default=[], help="extra dotted overrides for the dry run")
    ap.add_argument("--gpu", default="h100", help="GPU whose memory the dry run compares with")
    ap.add_argument("--skip-dryrun", action="store_true")
    a = ap.parse_args()

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          (a.device if a.device != "auto" else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = a.lengths or ([4096, 8192, 16384, 32768, 65536] if device.type == "cuda" else [1024, 2048, 4096])
    dev = device_name() if device.type == "cuda" else f"cpu-{os.cpu_count()}core-{platform.machine()}"
    mem_what = ("torch.cuda.max_memory_allocated above q/k/v, mask build included" if device.type == "cuda" else
                "bytes autograd saves for backward, one count per storage, plus the layout's cached bool mask; "
                "kernel temporaries not counted")
    print(f"device {dev}, {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"{a.heads} heads x {a.head_dim}, documents {a.doc_min}..{a.doc_max} tokens (seed {a.seed}), "
          f"flex from {FLEX_MIN_LEN} tokens on CUDA; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = [bench_length(seq, a, device, dtype) for seq in lengths]
    attention_table(rows, mem_what)
    cp = None if a.skip_dryrun else cp_memory(a)
    emit("long_context", {
        "device": dev, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
        "doc_min": a.doc_min, "doc_max": a.doc_max, "seed": a.seed, "iters": a.iters, "warmup": a.warmup,
        "memory_counts": mem_what, "attention": rows, "cp_dryrun": cp,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
