"""LoRA (Hu et al. 2021): ``train.lora.rank > 0`` adds a trainable low-rank update to the chosen linear layers of
every block and freezes everything else, so fine-tuning keeps one copy of the base weights and trains a few
thousandths of the parameters.

A target layer computes ``x W^T + b + (alpha / rank) (x A^T) B^T`` with ``A`` (rank x in) drawn normal with std
1/sqrt(in) (llmforge.model.init, a function of the seed and the name like every weight) and ``B`` (out x rank)
zero, so training starts from exactly the base model. The layer stays an ``nn.Linear`` named as before
(``layers.3.attention.wq.weight``) with two more parameters beside it (``...wq.lora_a``, ``...wq.lora_b``): a
pretrained checkpoint or HF folder loads by name (``train.init_from``), and checkpoints, resume, DDP, ZeRO-1/2/3
and pipeline stages treat the adapters as ordinary parameters. Tensor parallelism is refused (its plans shard
whole ``nn.Linear`` modules; the adapters would need their own plan).

``merge`` folds ``(alpha / rank) B A`` into ``W`` and removes the adapters: eval, generate, export_hf and the
in-training benchmarks see a plain model with the fine-tuned weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (a pretrained checkpoint or HF folder never holds one)."""
    return name.endswith((".lora_a", ".lora_b"))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with ``lora_a``/``lora_b`` beside its weight (made by ``add_adapters``, not constructed)."""
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_rank: int
    lora_alpha: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + update * (self.lora_alpha / self.lora_rank)


def _targets(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    found = []
    for block_name, block in model.layers.items():
        for sub_name, sub in block.named_modules():
            if isinstance(sub, nn.Linear) and sub_name.rsplit(".", 1)[-1] in targets:
                found.append((f"layers.{block_name}.{sub_name}", sub))
    return found


@torch.no_grad()
def add_adapters(model: nn.Module, rank: int, alpha: float, targets=TARGETS, seed: int | None = None) -> list[str]:
    """Turn the ``targets`` linears of every block into LoRALinear and freeze every other parameter; returns the
    adapter parameter names. On the meta device the adapters stay unallocated (the model's materialisation fills
    them by name); otherwise they are filled here from ``seed`` (None: left for a checkpoint to fill)."""
    from llmforge.model.init import fill_
    names = []
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in _targets(model, targets):
        w = lin.weight
        lin.__class__ = LoRALinear
        lin.lora_rank, lin.lora_alpha = rank, float(alpha)
        lin.lora_a = nn.Parameter(torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype))
        lin.lora_b = nn.Parameter(torch.empty(lin.out_features, rank, device=w.device, dtype=w.dtype))
        for leaf in ("lora_a", "lora_b"):
            names.append(f"{name}.{leaf}")
            if seed is not None and not w.is_meta:
                fill_(getattr(lin, leaf).data, names[-1], model.args, seed)
    if not names:
        raise ValueError(f"train.lora.targets={list(targets)}: no such linear layer in the blocks")
    return names


def adapter_spec(model_parts) -> dict | None:
    """``{rank, alpha, targets}`` of the adapters in these model parts, or None (a pipeline rank whose stages
    hold no block sees none: llmforge.inference.benchmarks asks the other ranks)."""
    targets, spec = set(), None
    for part in model_parts:
        for name, sub in part.named_modules():
            if isinstance(sub, LoRALinear):
                spec = {"rank": sub.lora_rank, "alpha": sub.lora_alpha}
                targets.add(name.rsplit(".", 1)[-1])
    return None if spec is None else {**spec, "targets": sorted(targets)}


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += alpha/rank B A) and make the layer a plain nn.Linear again."""
    for _, sub in list(model.named_modules()):
        if isinstance(sub, LoRALinear):
            delta = sub.lora_b.float() @ sub.lora_a.float() * (sub.lora_alpha / sub.lora_rank)
            sub.weight.add_(delta.to(sub.weight.dtype))
            del sub.lora_a, sub.lora_b, sub.lora_rank, sub.lora_alpha
            sub.__class__ = nn.Linear
    for p in model.parameters():
        p.requires_grad_(True)
    return model
