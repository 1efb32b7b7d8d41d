"""Peak memory of the loss: llmforge's chunked cross-entropy against ``F.cross_entropy(logits.float())``, same run.

Forward + backward of the loss over (tokens x vocab) logits in the training dtype (bf16 by default: what the
model hands the loss on a GPU). The plain loss upcasts the whole logits to fp32, keeps an fp32 log-softmax for
backward and produces an fp32 gradient; the chunked one upcasts one chunk at a time and keeps only a gradient
in the logits' dtype. Peak = the largest memory above what the logits themselves occupy:
``torch.cuda.max_memory_allocated`` on a GPU; on CPU the max RSS of a fresh forked process per variant.
Ratio = chunked / plain (lower is better). Losses are compared too (relative difference).

  python bench/loss_memory.py [--tokens 4096] [--vocab 32768] [--dtype bf16|fp32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, median  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmforge.core.loss import cross_entropy  # noqa: E402


def plain(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def measure(variant: str, tokens: int, vocab: int, dtype, device: str) -> dict:
    """Peak bytes above the logits, loss value and seconds for one forward + backward."""
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(2).requires_grad_()  # no fp32 temporary
    targets = torch.randint(0, vocab, (tokens,), device=device)
    fn = cross_entropy if variant == "chunked" else plain
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    loss = fn(logits, targets)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": int(peak), "loss": loss.item(), "seconds": time.perf_counter() - t}


def _child(variant, tokens, vocab, dtype, conn):
    torch.set_num_threads(1)
    conn.send(measure(variant, tokens, vocab, dtype, "cpu"))
    conn.close()


def run_isolated(variant, tokens, vocab, dtype) -> dict:
    """CPU: one fresh process per measurement, so max RSS starts from the same place for both variants."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(variant, tokens, vocab, dtype, send))
    p.start()
    out = recv.recv()
    p.join()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for _ in range(a.repeats):
        for variant in runs:  # alternate so machine noise hits both alike
            r = measure(variant, a.tokens, a.vocab, dtype, device) if device == "cuda" else \
                run_isolated(variant, a.tokens, a.vocab, dtype)
            runs[variant].append(r)
    logits_bytes = a.tokens * a.vocab * (2 if dtype == torch.bfloat16 else 4)
    res = {v: {"peak_bytes": int(median([r["peak_bytes"] for r in rs])),
               "seconds": median([r["seconds"] for r in rs]), "loss": rs[0]["loss"]} for v, rs in runs.items()}
    for v, r in res.items():
        print(f"{v:8s} peak above the logits {r['peak_bytes'] / 2**20:8.1f} MiB "
              f"({r['peak_bytes'] / logits_bytes:.2f}x the logits)  {r['seconds'] * 1e3:.0f} ms  loss {r['loss']:.6f}")
    emit("loss_memory", {
        "tokens": a.tokens, "vocab": a.vocab, "dtype": a.dtype, "logits_bytes": logits_bytes,
        "plain_peak_bytes": res["plain"]["peak_bytes"], "chunked_peak_bytes": res["chunked"]["peak_bytes"],
        "peak_ratio_chunked_vs_plain": round(res["chunked"]["peak_bytes"] / max(1, res["plain"]["peak_bytes"]), 3),
        "time_ratio_chunked_vs_plain": round(res["chunked"]["seconds"] / res["plain"]["seconds"], 3),
        "loss_rel_diff": abs(res["chunked"]["loss"] - res["plain"]["loss"]) / abs(res["plain"]["loss"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
