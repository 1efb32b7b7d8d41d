"""The trainable parameters of a model's parts, each once (tied weights and parts sharing a tensor counted once):
what every optimizer builds its groups from."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


def trainable_parameters(model_parts: list[nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for part in model_parts:
        for name, p in part.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield name, p
