"""Parameter names and walks shared by the optimizers, the model init and the parallel code: the trainable
parameters of a model's parts, each once (what every optimizer builds its groups from), a name with the
parallel/compile wrappers' prefixes removed, the kinds of a set of names (for start-up lines), and a sharded
(DTensor) parameter's local part."""
from __future__ import annotations

import re
from typing import Iterator

import torch
import torch.nn as nn


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (a rank's shard); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The parameter's (or module's) name in the plain model (activation-checkpoint / compile / DDP wrappers
    removed)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name.removeprefix("module.")


def name_kinds(names) -> str:
    """"attention.wq, feed_forward.w1, ...": the distinct names with wrappers, layer index and ``.weight`` dropped."""
    return ", ".join(sorted({re.sub(r"(^|\.)layers\.\d+\.", r"\1", canonical_name(n)).removesuffix(".weight")
                             for n in names}))


def trainable_parameters(model_parts: list[nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for part in model_parts:
        for name, p in part.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield name, p
