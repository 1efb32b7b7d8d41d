"""Fine-tuning transforms of the whole (possibly meta) model, applied by the model build before any
parallelism: ``train.lora`` adapters (llmforge/model/lora.py) and ``train.freeze`` groups. DDP, FSDP, TP and the
pipeline split then keep each parameter's ``requires_grad``.

``train.freeze``: ``embeddings`` (token and position embeddings), ``head`` (final norm and output projection),
``blocks:K`` (the first K transformer blocks), ``block:I`` (block I). With tied embeddings, ``embeddings`` and
``head`` share the one matrix. Frozen parameters get no gradient and no optimizer state and stay bit-identical.
"""
from __future__ import annotations

import re

from llmforge.core.config import ConfigError

FREEZE_NAMES = re.compile(r"embeddings|head|blocks:\d+|block:\d+")


def apply_finetune(model, train_cfg, seed: int) -> None:
    """LoRA adapters (``train.lora.rank``; everything else frozen), then the ``train.freeze`` groups."""
    if train_cfg.lora.rank:  # the adapters are parameters like any other from here on
        from llmforge.model.lora import add_adapters
        lora = train_cfg.lora
        add_adapters(model, lora.rank, lora.alpha, lora.targets, seed=seed)
    if train_cfg.freeze:
        freeze(model, train_cfg.freeze)


def _prefixes(names: list[str], n_layers: int) -> list[str]:
    prefixes = []
    for name in names:
        if not FREEZE_NAMES.fullmatch(name):
            raise ConfigError(f"train.freeze: unknown group {name!r} (embeddings, head, blocks:K, block:I)")
        if name == "embeddings":
            prefixes += ["tok_embeddings.", "pos_embeddings."]
        elif name == "head":
            prefixes += ["norm.", "output."]
        else:
            k = int(name.split(":")[1])
            if (k > n_layers) if name.startswith("blocks:") else (k >= n_layers):
                raise ConfigError(f"train.freeze: {name} but the model has {n_layers} blocks")
            prefixes += [f"layers.{i}." for i in (range(k) if name.startswith("blocks:") else [k])]
    return prefixes


def freeze(model, names: list[str]) -> list[str]:
    """Set requires_grad=False on the named groups; returns the names of every frozen parameter."""
    prefixes = tuple(_prefixes(names, len(model.layers)))
    params = list(model.named_parameters(remove_duplicate=False))
    for pname, p in params:
        if pname.startswith(prefixes):
            p.requires_grad_(False)
    frozen = [pname for pname, p in params if not p.requires_grad]
    if frozen and len(frozen) == len(params):
        raise ConfigError(f"train.freeze={names} freezes every parameter: nothing would train")
    return frozen
