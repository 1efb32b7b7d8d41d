"""AdamW with decay/no-decay groups (or Muon + AdamW: muon.py) and the LR schedules (warmup + cosine, WSD, constant). Gradient clipping is
the engine's (ParallelModel.clip_grad_norm over every shard and stage; DeepSpeed's gradient_clipping)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .params import trainable_parameters


def param_groups(model_parts: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices; never decay norms, biases or embeddings (GPT-2/Llama practice)."""
    decay, no_decay = [], []
    for name, p in trainable_parameters(model_parts):
        (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_parts: list[nn.Module], tcfg, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW over decay / no-decay groups, or Muon + AdamW (llmforge/core/muon.py)."""
    if tcfg.optimizer == "muon":
        from .muon import build_muon
        return build_muon(model_parts, tcfg, param_groups(model_parts, tcfg.weight_decay))
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    if tcfg.fused_optimizer or (tcfg.fused_optimizer is None and device.type == "cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model_parts, tcfg.weight_decay), **kwargs)


def lr_factor(step: int, tcfg) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then cosine / WSD / constant."""
    warm = tcfg.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    total, floor = max(tcfg.steps, 1), tcfg.min_lr_ratio
    if tcfg.schedule == "constant":
        return 1.0
    if tcfg.schedule == "wsd":  # warmup-stable-decay: linear decay over the last decay_fraction of steps
        decay_steps = int(round(total * tcfg.decay_fraction))
        start = total - decay_steps
        if step < start or decay_steps == 0:
            return 1.0
        return floor + (1 - floor) * max(0.0, (total - step - 1) / decay_steps)
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate into every group (Muon's matrices scale it by their own ``lr_scale``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
