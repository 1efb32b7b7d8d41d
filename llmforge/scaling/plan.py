"""From a budget (FLOPs, or GPU-hours at a stated MFU) to a compute-optimal model, token count, batch, layout and a
ready-to-run trainer config.

Steps: closed-form optimum N*, D* of the law -> the nearest Llama shape (its exact N) -> D = C / 6N -> global batch
and learning rate from the compute-optimal hyper-parameter fits of DeepSeek LLM (Bi et al. 2024, arXiv:2401.02954:
B_opt = 0.2920 C^0.3271 tokens, lr_opt = 0.3118 C^-0.1250) -> the first parallel layout whose per-rank memory
estimate fits (llmforge.scaling.memory) -> a config written atomically via llmforge.core.config.
"""
from __future__ import annotations

import math

from .law import ScalingError, ScalingLaw
from .memory import GPUS, GPUS_PER_NODE, choose_layout, gpu_info, usable_bytes
from .shapes import Shape, round_to_shape, smallest
from llmforge.common import atomic

DEFAULT_BASE = "configs/scaling/base.yaml"
DEFAULT_MFU = 0.4          # a typical sustained MFU for dense bf16 training at scale
DEFAULT_VOCAB = 128256     # Llama 3's tokenizer
MAX_AUTO_GPUS = 65536
MAX_AUTO_DAYS = 90         # without --gpus, plan enough GPUs to train within this many days


def deepseek_batch_tokens(flops: float) -> float:
    return 0.2920 * flops ** 0.3271


def deepseek_lr(flops: float) -> float:
    return 0.3118 * flops ** -0.1250


def budget_flops(flops: float | None, gpu_hours: float | None, gpu: str, mfu: float) -> float:
    """C in FLOPs: given directly, or GPU-hours (summed over GPUs) x 3600 x the GPU's dense bf16 peak x MFU."""
    if gpu.lower() not in GPUS:
        raise ScalingError(f"--gpu {gpu!r}: unknown; choose one of {', '.join(sorted(GPUS))}")
    if (flops is None) == (gpu_hours is None):
        raise ScalingError("give exactly one budget: --flops F or --gpu-hours H")
    if not 0 < mfu <= 1:
        raise ScalingError(f"--mfu must be in (0, 1], got {mfu}")
    if flops is not None:
        if not (math.isfinite(flops) and flops > 0):
            raise ScalingError(f"--flops must be a positive number, got {flops}")
        return flops
    if not (math.isfinite(gpu_hours) and gpu_hours > 0):
        raise ScalingError(f"--gpu-hours must be a positive number, got {gpu_hours}")
    return gpu_hours * 3600 * gpu_info(gpu)[1] * mfu


def min_budget(law: ScalingLaw, shape: Shape) -> float:
    """The budget whose optimum N equals this shape's size (inverse of N_opt = G (C/6)^(beta/(alpha+beta)))."""
    return 6 * (shape.params() / law.g) ** ((law.alpha + law.beta) / law.beta)


def _fits_somewhere(shape: Shape, gpus: int | None, gpu_mem: float, seq_len: int, min_gpus: float = 1):
    """(gpus, layout, memory): the given GPU count, or the fewest of 1, 2, 4, 8, then whole 8-GPU nodes doubling,
    that is at least ``min_gpus`` and holds the model."""
    counts = [gpus] if gpus else [g for g in [1, 2, 4] + [GPUS_PER_NODE * 2 ** k for k in range(14)]
                                  if g >= min_gpus or g == MAX_AUTO_GPUS]
    best_mem = None
    for g in counts:
        if g > MAX_AUTO_GPUS:
            break
        layout, mem = choose_layout(shape, g, gpu_mem, seq_len)
        if layout is not None:
            return g, layout, mem
        if best_mem is None or (mem and mem["total"] < best_mem["total"]):
            best_mem = mem
    return (gpus or counts[-1]), None, best_mem


def make_plan(law: ScalingLaw, flops: float, vocab: int, seq_len: int, gpu: str = "h100", gpus: int | None = None,
              mfu: float = DEFAULT_MFU) -> dict:
    """Everything but the config file: shape, tokens, batch, steps, lr, layout, memory, predicted loss, time."""
    if gpu.lower() not in GPUS:
        raise ScalingError(f"--gpu {gpu!r}: unknown; choose one of {', '.join(sorted(GPUS))}")
    if gpus is not None and gpus < 1:
        raise ScalingError(f"--gpus must be >= 1, got {gpus}")
    gpu_mem, peak = gpu_info(gpu)
    n_opt, d_opt = law.optimum(flops)
    tiny = smallest(vocab)
    if n_opt < tiny.params():
        raise ScalingError(
            f"budget {flops:.3g} FLOPs is too small: its compute-optimal size {n_opt:.3g} parameters is below the "
            f"smallest model ({tiny.params():,} parameters: {tiny.describe()}); it needs at least "
            f"{min_budget(law, tiny):.3g} FLOPs")
    shape = round_to_shape(n_opt, vocab)
    n = shape.params()
    # Without --gpus: enough GPUs to finish within MAX_AUTO_DAYS at the MFU (and to hold the model).
    time_gpus = shape.flops_per_token(seq_len) * flops / (6 * n) / (peak * mfu * MAX_AUTO_DAYS * 86400)
    g, layout, mem = _fits_somewhere(shape, gpus, gpu_mem, seq_len, min_gpus=time_gpus)
    if layout is None:
        need = mem["total"] / 2 ** 30 if mem else float("nan")
        raise ScalingError(
            f"{n:.3g} parameters ({shape.describe()}) do not fit on {g} x {gpu}: the leanest layout needs "
            f"~{need:.1f} GiB per GPU, {usable_bytes(gpu_mem) / 2 ** 30:.1f} GiB usable; use more GPUs or a bigger GPU")
    unit = layout.dp * layout.micro_batch * (layout.pp if layout.pp > 1 else 1)
    # DeepSeek's optimum is broad: round the batch to unit x a power of two (unit = dp x micro [x pp])
    gbs = unit * 2 ** max(0, round(math.log2(max(1.0, deepseek_batch_tokens(flops) / seq_len / unit))))
    steps = round(flops / (6 * n) / (gbs * seq_len))
    if steps < 1:
        raise ScalingError(f"budget {flops:.3g} FLOPs is too small: {n:,} parameters need {6 * n * gbs * seq_len:.3g} "
                           f"FLOPs for one step of {gbs} x {seq_len} tokens on {g} GPUs")
    tokens = steps * gbs * seq_len
    model_flops = shape.flops_per_token(seq_len) * tokens       # with the attention term, for the time estimate
    gpu_hours = model_flops / (peak * mfu) / 3600
    return {
        "params": n, "non_embedding_params": shape.non_embedding_params(), "tokens": tokens, "flops": flops,
        "flops_6nd": 6.0 * n * tokens, "tokens_per_param": tokens / n,
        "predicted_loss": float(law.loss(n, tokens)), "optimal_params": n_opt, "optimal_tokens": d_opt,
        "optimal_loss": float(law.loss(n_opt, d_opt)), "shape": shape.model_overrides() | {"seq_len": seq_len},
        "global_batch_size": gbs, "global_batch_tokens": gbs * seq_len, "steps": steps,
        "lr": deepseek_lr(flops), "warmup_steps": max(1, min(2000, steps // 100)),
        "gpu": gpu.lower(), "gpus": g, "mfu": mfu, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / g,
        "layout": layout.config_overrides() | {"description": layout.describe()},
        "memory_gib_per_gpu": {k: v / 2 ** 30 for k, v in mem.items()},
        "usable_gib_per_gpu": usable_bytes(gpu_mem) / 2 ** 30,
        "law": law.to_dict(),
    }


def _fmt(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def config_overrides(plan: dict, run_dir: str) -> list[str]:
    shape = plan["shape"]
    kv = {f"model.{k}": v for k, v in shape.items() if k != "seq_len"}
    kv.update({"model.max_seq_len": shape["seq_len"], "data.seq_len": shape["seq_len"], "run_dir": run_dir,
               "train.steps": plan["steps"], "train.global_batch_size": plan["global_batch_size"],
               "train.lr": float(f"{plan['lr']:.3g}"), "train.warmup_steps": plan["warmup_steps"]})
    kv.update({k: v for k, v in plan["layout"].items() if k != "description"})
    return [f"{k}={_fmt(v)}" for k, v in kv.items()]


def write_config(plan: dict, base: str, out_path: str, run_dir: str, extra: list[str]) -> str:
    """base YAML + the plan's keys + the user's key=value overrides, validated by llmforge.core.config and written
    atomically; the written file loads with ``load_config(RunConfig, out_path)``."""
    from llmforge.core.config import ConfigError, RunConfig, dump_config, load_config
    try:
        cfg = load_config(RunConfig, base, config_overrides(plan, run_dir) + list(extra))
    except ConfigError as e:
        raise ScalingError(str(e)) from None
    dump_config(cfg, out_path)
    return out_path


def resolve_vocab(base: str, extra: list[str], vocab: int | None) -> int:
    """--vocab, else the base config's model vocabulary (preset or model.vocab_size), else the tokenizer next to its
    data.paths, else Llama 3's."""
    if vocab is not None:
        if vocab < 2:
            raise ScalingError(f"--vocab must be >= 2, got {vocab}")
        return vocab
    from llmforge.core.config import ConfigError, RunConfig, load_config
    from llmforge.model.presets import PRESETS
    try:
        cfg = load_config(RunConfig, base, list(extra))
    except ConfigError as e:
        raise ScalingError(str(e)) from None
    v = cfg.model.vocab_size or getattr(PRESETS.get(cfg.model.preset), "vocab_size", 0)
    if v:
        return v
    return tokenizer_vocab(cfg.data.paths) or DEFAULT_VOCAB


def tokenizer_vocab(paths: list[str]) -> int | None:
    from llmforge.data.streams import find_tokenizer
    tok = find_tokenizer(paths)
    if not tok:
        return None
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=tok).vocab_size()


def table(plan: dict) -> str:
    s, lay, m = plan["shape"], plan["layout"], plan["memory_gib_per_gpu"]
    rows = [
        ("budget", f"{plan['flops']:.3g} FLOPs (C = 6ND)"),
        ("law", plan["law"]["source"] or "user law"),
        ("compute-optimal N, D", f"{plan['optimal_params']:.4g} params, {plan['optimal_tokens']:.4g} tokens"),
        ("model", f"{plan['params']:,} params ({plan['non_embedding_params']:,} without embeddings)"),
        ("shape", f"{s['n_layers']} layers, dim {s['dim']}, {s['n_heads']} heads ({s['n_kv_heads']} kv), "
                  f"ffn {s['ffn_dim']}, vocab {s['vocab_size']}"),
        ("tokens", f"{plan['tokens']:,} ({plan['tokens_per_param']:.1f} per parameter)"),
        ("batch", f"{plan['global_batch_size']} x {s['seq_len']} = {plan['global_batch_tokens']:,} tokens, "
                  f"{plan['steps']:,} steps, lr {plan['lr']:.3g}"),
        ("predicted loss", f"{plan['predicted_loss']:.4f} (at the exact optimum {plan['optimal_loss']:.4f})"),
        ("cluster", f"{plan['gpus']} x {plan['gpu']}, MFU {plan['mfu']:.0%}: {plan['gpu_hours']:,.0f} GPU-hours, "
                    f"{plan['wall_hours']:,.1f} h wall"),
        ("layout", lay["description"]),
        ("memory per GPU", f"{m['total']:.1f} GiB of {plan['usable_gib_per_gpu']:.1f} usable "
                           f"(states {m['states']:.1f}, "
                           f"activations {m['activations']:.1f}, logits {m['logits']:.1f})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def write_json(path: str, obj) -> None:
    atomic.write_json(path, obj, sort_keys=False)
