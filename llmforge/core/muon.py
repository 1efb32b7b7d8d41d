"""Muon for the blocks' weight matrices and AdamW for everything else, in one optimizer (``train.optimizer:
muon``).

Muon (Keller Jordan 2024): SGD momentum (Nesterov by default) whose update of each 2-D matrix is orthogonalised
by a Newton–Schulz iteration (the quintic with coefficients (3.4445, -4.7750, 2.0315), 5 steps, run in fp32
here), i.e. its singular values pushed towards 1. The update is then scaled per matrix: ``rms`` (Moonlight, Liu
et al. 2025: 0.2·sqrt(max(rows, cols)), so the update's RMS matches AdamW's and AdamW's learning rate and weight
decay carry over: the default), ``spectral`` (sqrt(max(1, rows / cols)), the original), or ``none``.

Which tensors: every 2-D weight inside a transformer block (attention wq/wk/wv/wo each on its own, so QKV is
orthogonalised per projection; MLP w1/w2/w3). Embeddings, the output head, norms, biases and LoRA adapters
take AdamW (``muon_names`` decides; the trainer prints the split at start).

Distributed exactly: a sharded matrix (an FSDP2 or TP DTensor) is gathered whole (``full_tensor``), every rank
runs the same Newton–Schulz on it and keeps its own shard of the result, so any layout computes the update one
process would (every rank orthogonalises every matrix: simple and exact; splitting the matrices over ranks is
the next step for large models). AdamW's part is elementwise and runs on the local shards.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from .params import name_kinds, trainable_parameters

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """An approximate U·Vᵀ of ``g = U·S·Vᵀ`` (fp32): normalise by the Frobenius norm, then ``steps`` quintic
    iterations X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation (rows ≤ cols)."""
    a, b, c = coefficients
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


def update_scale(shape, rule: str, rms_scale: float) -> float:
    rows, cols = shape[0], shape[1]
    if rule == "rms":
        return rms_scale * math.sqrt(max(rows, cols))
    if rule == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block that is not a LoRA adapter."""
    return p.ndim == 2 and ".layers." in f".{name}" and name.endswith(".weight") and "lora_" not in name


def muon_names(model_parts) -> tuple[list[str], list[str]]:
    """(names that take Muon, names that take AdamW) among the trainable parameters."""
    muon, adamw = [], []
    for name, p in trainable_parameters(model_parts):
        (muon if is_muon_param(name, p) else adamw).append(name)
    return muon, adamw


class Muon(torch.optim.Optimizer):
    """Groups with ``use_muon`` True get Muon, the others AdamW (decoupled weight decay, bias correction).
    A group's ``lr_scale`` multiplies the scheduled learning rate (``train.muon.lr`` / ``train.lr``)."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_coefficients=NS_COEFFICIENTS, scale: str = "rms", rms_scale: float = 0.2,
                 betas=(0.9, 0.95), eps: float = 1e-8):
        defaults = dict(lr=lr, lr_scale=1.0, weight_decay=0.0, use_muon=False, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), scale=scale, rms_scale=rms_scale,
                        betas=tuple(betas), eps=eps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.mul_(mu).add_(p.grad)
        u = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
        whole = u.full_tensor() if isinstance(u, DTensor) else u  # the same matrix on every rank
        o = newton_schulz(whole, group["ns_steps"], group["ns_coefficients"])
        o = o.mul_(update_scale(whole.shape, group["scale"], group["rms_scale"])).to(p.dtype)
        if isinstance(p, DTensor):  # this rank's shard of the orthogonalised update (no communication)
            o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
        lr = group["lr"] * group["lr_scale"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(o, alpha=-lr)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), g = group["betas"], p.grad
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        lr = group["lr"] * group["lr_scale"]
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))


def build_muon(model_parts, tcfg, adamw_groups: list[dict]) -> Muon:
    """Muon over the blocks' matrices, AdamW over the rest in ``adamw_groups`` (optim.param_groups: decay /
    no-decay) minus those matrices."""
    m = tcfg.muon
    muon = [p for name, p in trainable_parameters(model_parts) if is_muon_param(name, p)]
    wd = tcfg.weight_decay if m.weight_decay is None else m.weight_decay
    groups = [{"params": muon, "use_muon": True, "weight_decay": wd, "lr_scale": (m.lr or tcfg.lr) / tcfg.lr}]
    taken = {id(p) for p in muon}
    for g in adamw_groups:
        groups.append({**g, "params": [p for p in g["params"] if id(p) not in taken]})
    return Muon([g for g in groups if g["params"]], lr=tcfg.lr, momentum=m.momentum, nesterov=m.nesterov,
                ns_steps=m.ns_steps, ns_coefficients=m.ns_coefficients, scale=m.update_scale,
                rms_scale=m.rms_scale, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)


def describe_split(model_parts) -> str:
    """One start-up line: which parameter kinds (layer index dropped) take Muon and which AdamW, with counts."""
    muon, adamw = muon_names(model_parts)
    return f"muon: {len(muon)} matrices ({name_kinds(muon)}); adamw: {len(adamw)} tensors ({name_kinds(adamw)})"
