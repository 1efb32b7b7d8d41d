"""An explicit per-rank memory estimate for training a Llama shape, and the choice of a parallel layout that fits.

Stand-alone on purpose (no model is built): the planner sizes clusters far beyond this machine. Bytes per
parameter follow llmforge's mixed precision (fp32 master weights, fp32 gradients, fp32 Adam m and v = 16 B, bf16
compute copies); activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") adapted to SwiGLU + GQA with flash attention (SDPA keeps no s x s scores).
"""
from __future__ import annotations

import dataclasses

from .shapes import Shape

GIB = 2 ** 30
# Memory per device (vendor GB, bytes) and the llmforge.train.metrics peak-table key for its dense bf16 peak.
GPUS = {
    "h100": (80e9, "H100"), "h200": (141e9, "H200"), "a100": (80e9, "A100"), "a100-40gb": (40e9, "A100"),
    "b200": (180e9, "B200"),
}
USABLE_FRACTION, RESERVED_BYTES = 0.9, 2 * GIB  # allocator fragmentation; CUDA context + NCCL buffers
GPUS_PER_NODE = 8                               # TP stays inside a node


def gpu_info(name: str) -> tuple[float, float]:
    """(memory bytes, peak bf16 FLOP/s) of a GPU name from GPUS."""
    from llmforge.train.metrics import PEAK_BF16_TFLOPS
    key = name.lower()
    if key not in GPUS:
        raise KeyError(name)
    mem, peak_key = GPUS[key]
    return mem, PEAK_BF16_TFLOPS[peak_key] * 1e12


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int      # 0 DDP, 1 + sharded optimizer, 3 FSDP2 (dp_shard = dp)
    micro_batch: int
    recompute: str       # none | full

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def config_overrides(self) -> dict:
        shard = self.zero_stage in (2, 3)
        return {"parallel.tp": self.tp, "parallel.pp": self.pp, "parallel.zero_stage": self.zero_stage,
                "parallel.dp_shard": self.dp if shard else 1, "parallel.dp_replicate": 1 if shard else self.dp,
                "parallel.pp_schedule": "1F1B", "train.micro_batch_size": self.micro_batch,
                "recompute": self.recompute}

    def describe(self) -> str:
        dp = f"fsdp{self.dp}" if self.zero_stage == 3 else f"dp{self.dp}" + (" zero1" if self.zero_stage == 1 else "")
        return f"pp{self.pp} x {dp} x tp{self.tp}, micro batch {self.micro_batch}, recompute {self.recompute}"


def stage_params(shape: Shape, pp: int) -> int:
    """Parameters on the largest pipeline stage (blocks split evenly; embedding on the first stage, final norm and
    output projection on the last)."""
    per_stage = -(-shape.n_layers // pp) * shape.layer_params()
    emb = shape.vocab_size * shape.dim
    if pp == 1:
        return per_stage + 2 * emb + shape.dim
    return per_stage + emb + shape.dim


def rank_memory(shape: Shape, layout: Layout, seq_len: int) -> dict:
    """Bytes on the fullest rank, by kind. Everything is divided by TP (matrices are sharded; the replicated norms
    are negligible)."""
    p = stage_params(shape, layout.pp) / layout.tp
    dp = layout.dp
    if layout.zero_stage == 0:
        states = 16 * p
    elif layout.zero_stage == 1:
        states = 8 * p + 8 * p / dp                     # weights + grads whole, Adam sharded
    else:
        states = 16 * p / dp + 2 * 2 * shape.layer_params() / layout.tp  # + gathered bf16 layer and its prefetch
    s, b, h = seq_len, layout.micro_batch, shape.dim
    # Saved bf16 tensors of one block per token: norm in/out x2 (4h), q and attention output (2h), k, v (2 kv),
    # and the SwiGLU w1/w3 outputs, silu and product (4 ffn); sequence parallel shards the norm regions too.
    per_layer = 2 * s * b * (6 * h + 2 * shape.kv_dim + 4 * shape.ffn_dim) / layout.tp
    layers = -(-shape.n_layers // layout.pp)
    # 1F1B: the first stage keeps up to pp micro batches in flight (Korthikanti et al.: L layers' worth in total).
    in_flight = layout.pp
    if layout.recompute == "full":
        activations = in_flight * layers * 2 * s * b * h / layout.tp + per_layer   # block inputs + one recomputed
    else:
        activations = in_flight * layers * per_layer
    logits = s * b * shape.vocab_size * (2 + 4 + 4) / layout.tp   # bf16 logits, fp32 copy and its gradient
    total = states + activations + logits
    return {"states": states, "activations": activations, "logits": logits, "total": total}


def usable_bytes(gpu_mem: float) -> float:
    return USABLE_FRACTION * gpu_mem - RESERVED_BYTES


def _divisors_pow2(n: int, limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        if n % k == 0:
            out.append(k)
        k *= 2
    return out


def choose_layout(shape: Shape, gpus: int, gpu_mem: float, seq_len: int) -> tuple[Layout | None, dict | None]:
    """The first layout that fits, in this order of preference: fewest pipeline stages, no recomputation, least
    tensor parallelism, ZeRO-1/DDP over FSDP, the largest micro batch (up to 8). Returns (layout, its memory) or
    (None, the smallest estimate seen) when nothing fits."""
    limit = usable_bytes(gpu_mem)
    smallest = None
    tps = [t for t in _divisors_pow2(gpus, GPUS_PER_NODE) if shape.n_heads % t == 0 and shape.n_kv_heads % t == 0]
    pps = [p for p in _divisors_pow2(gpus, shape.n_layers) if p == 1 or shape.n_layers % p == 0]
    for pp in pps:
        for recompute in ("none", "full"):
            for tp in tps:
                if gpus % (tp * pp):
                    continue
                dp = gpus // (tp * pp)
                stages = (0,) if dp == 1 else (1, 3)
                for zero in stages:
                    for micro in (8, 4, 2, 1):
                        layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=micro, recompute=recompute)
                        mem = rank_memory(shape, layout, seq_len)
                        if mem["total"] <= limit:
                            return layout, mem
                        if smallest is None or mem["total"] < smallest["total"]:
                            smallest = mem
    return None, smallest
