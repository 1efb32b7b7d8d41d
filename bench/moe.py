"""Forward + backward tokens/s of the MoE layer (llmforge/model/moe.py) against two baselines, same run.

- ``ours``: ``llmforge.model.moe.MoE`` in training mode (router, dropless routing sorted by expert, the exact
  per-expert loop on CPU, one ``torch._grouped_mm`` per projection on CUDA in bf16; aux loss injected in backward).
- ``dense``: a SwiGLU layer of the same active FLOPs per token (hidden = top_k * expert ffn_dim), no router.
  Its ratio is the price of sparsity at equal compute (the routing, gathers and scatters, smaller GEMMs).
- ``naive``: the per-expert loop of many reference implementations (HF Mixtral/Qwen-MoE style): router softmax +
  top-k, then for each expert ``torch.where`` over the token x slot mask, gather its tokens, an ``nn.Linear``
  SwiGLU expert, weight, ``index_add_`` back. Same weights as ours (checked: same output).

Each iteration runs the three in turn (interleaved, so machine noise hits all alike): forward, backward of a
scalar loss with respect to the input and the weights, grads dropped. Medians of the per-iteration times after
``--warmup`` untimed rounds. Ratios (of tokens/s) > 1 mean ours is faster; the ratios of the fastest iterations
(``*_minima``) are reported too, the figure to read on a shared, loaded machine. Ends with ``RESULT {json}`` (also saved under
bench/results/moe-<device>.json).

  python bench/moe.py [--tokens 4096] [--dim 256] [--experts 8] [--top-k 2] [--ffn 512] [--iters 12]
                      [--warmup 2] [--device auto|cpu|cuda] [--dtype fp32|bf16] [--threads 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, emit, median  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmforge.model.moe import MoE, MoEArgs, SharedExperts, _grouped_available  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


DenseSwiGLU = SharedExperts  # a plain SwiGLU MLP (dim -> hidden -> dim), bias-free


class NaiveMoE(nn.Module):
    """The per-expert mask loop as reference implementations write it (one nn.Linear SwiGLU module per expert)."""

    def __init__(self, dim: int, ffn: int, experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(DenseSwiGLU(dim, ffn) for _ in range(experts))

    @torch.no_grad()
    def load_from(self, moe: MoE) -> None:
        self.gate.weight.copy_(moe.router.gate.weight)
        for e, ex in enumerate(self.experts):
            ex.w1.weight.copy_(moe.experts.w1[e])
            ex.w2.weight.copy_(moe.experts.w2[e])
            ex.w3.weight.copy_(moe.experts.w3[e])

    def forward(self, x):
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        mask = F.one_hot(chosen, self.num_experts).permute(2, 1, 0)  # (E, k, N)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            y = self.experts[e](flat[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.view(b, s, h)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module: nn.Module, x: torch.Tensor, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = module(x)
    out.float().square().mean().backward()
    sync(device)
    dt = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    x.grad = None
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens are laid out as (tokens / seq_len, seq_len)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512, help="each expert's hidden size")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="", choices=["", "fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          (a.device if a.device != "auto" else "cpu"))
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tokens % a.seq_len:
        raise SystemExit(f"--tokens {a.tokens} is not a multiple of --seq-len {a.seq_len}")

    torch.manual_seed(a.seed)
    margs = MoEArgs(num_experts=a.experts, top_k=a.top_k, ffn_dim=a.ffn, balance="aux_loss")
    ours = MoE(a.dim, a.ffn, margs)
    with torch.no_grad():
        nn.init.normal_(ours.router.gate.weight, std=0.02)
        for w in (ours.experts.w1, ours.experts.w2, ours.experts.w3):
            nn.init.normal_(w, std=0.02)
    naive = NaiveMoE(a.dim, a.ffn, a.experts, a.top_k)
    naive.load_from(ours)
    dense = DenseSwiGLU(a.dim, a.top_k * a.ffn)
    for m in (ours, naive, dense):
        m.to(device=device, dtype=dtype).train()
    x = torch.randn(a.tokens // a.seq_len, a.seq_len, a.dim, device=device, dtype=dtype, requires_grad=True)
    path = "grouped_mm" if _grouped_available(x) else "loop"

    with torch.no_grad():  # same weights, same routing: the naive loop must give our output
        ref = ours.eval()(x)
        diff = float((naive(x).float() - ref.float()).abs().max() / ref.float().abs().max())
        ours.train()
        counts = torch.bincount(ours.router(x.reshape(-1, a.dim), None)[1].flatten(), minlength=a.experts)
    max_share = float(counts.max() / counts.sum())
    print(f"device {device_name() if device.type == 'cuda' else device}, {dtype}, threads {torch.get_num_threads()}, "
          f"tokens {a.tokens}, dim {a.dim}, {a.experts} experts top-{a.top_k} ffn {a.ffn}; ours uses the {path} path; "
          f"naive vs ours max rel diff {diff:.2e}; largest expert share {max_share:.3f}", flush=True)

    variants = {"ours": ours, "dense": dense, "naive": naive}
    times = {k: [] for k in variants}
    for it in range(a.warmup + a.iters):
        for name, mod in variants.items():
            dt = step(mod, x, device)
            if it >= a.warmup:
                times[name].append(dt)
        ours.tokens_per_expert.zero_(), ours.aux_total.zero_(), ours.aux_batches.zero_()
    med = {k: median(v) for k, v in times.items()}
    tps = {k: a.tokens / v for k, v in med.items()}
    for k in variants:
        print(f"{k:6s} {med[k] * 1e3:8.2f} ms/iter (median of {a.iters}, min {min(times[k]) * 1e3:.2f})  "
              f"{tps[k]:10.0f} tokens/s", flush=True)
    r_dense, r_naive = tps["ours"] / tps["dense"], tps["ours"] / tps["naive"]
    mins = {k: min(v) for k, v in times.items()}  # the least disturbed iteration of each (shared machines)
    m_dense, m_naive = mins["dense"] / mins["ours"], mins["naive"] / mins["ours"]
    print(f"ours / dense (equal active FLOPs) tokens/s: {r_dense:.3f} (minima {m_dense:.3f}); "
          f"ours / naive loop: {r_naive:.3f} (minima {m_naive:.3f})", flush=True)

    active_flops = 6 * a.tokens * 3 * a.dim * a.ffn * a.top_k  # fwd+bwd of the expert GEMMs, router excluded
    emit("moe", {
        "device": device_name() if device.type == "cuda" else f"cpu-{os.cpu_count()}core-{platform.machine()}", "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "ours_path": path,
        "tokens": a.tokens, "seq_len": a.seq_len, "dim": a.dim, "experts": a.experts, "top_k": a.top_k,
        "expert_ffn": a.ffn, "dense_ffn": a.top_k * a.ffn, "iters": a.iters, "warmup": a.warmup,
        "largest_expert_share": round(max_share, 4), "naive_vs_ours_max_rel_diff": float(f"{diff:.3e}"),
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "min_ms": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "expert_gflops_per_s": {k: round(active_flops / v / 1e9, 2) for k, v in med.items()},
        "ours_vs_dense": round(r_dense, 3), "ours_vs_naive": round(r_naive, 3),
        "ours_vs_dense_minima": round(m_dense, 3), "ours_vs_naive_minima": round(m_naive, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
