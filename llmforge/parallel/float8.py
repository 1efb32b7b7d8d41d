"""Float8 training of the blocks' linear layers (``train.float8``): torchao's ``convert_to_float8_training``
swaps each ``nn.Linear`` inside a transformer block whose in and out features are multiples of 16 for a
``Float8Linear`` (its matmuls in float8 with dynamic scales, ``train.float8_recipe`` tensorwise | rowwise). The
output head, embeddings and LoRA layers stay as they are. Applied to the whole model before the pipeline split,
recomputation, compile and FSDP, so every layout converts the same layers; parameter names do not change, so
checkpoints move between float8 and bf16 runs.

Float8 matmuls need a GPU with float8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); elsewhere
the run is refused in one line, unless ``train.float8_emulate`` asks for torchao's emulation (float8 rounding in
higher-precision kernels, for tests on CPU). Under FSDP2 on CUDA the weights are all-gathered in float8
(``enable_fsdp_float8_all_gather``, tensorwise only). TP with float8 is not wired yet and is refused
(why: llmforge/core/config.py).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from llmforge.core.config import ConfigError
from llmforge.core.params import canonical_name, name_kinds

RECIPES = ("tensorwise", "rowwise")


def block_linear_shapes(margs) -> dict[str, tuple[int, int]]:
    """(in, out) features of each kind of linear in a block."""
    hd, kv = margs.head_dim, margs.n_kv_heads * margs.head_dim
    shapes = {"wq": (margs.dim, margs.n_heads * hd), "wk": (margs.dim, kv), "wv": (margs.dim, kv),
              "wo": (margs.n_heads * hd, margs.dim), "w1": (margs.dim, margs.ffn_dim), "w2": (margs.ffn_dim, margs.dim)}
    if margs.family != "gpt2":
        shapes["w3"] = (margs.dim, margs.ffn_dim)
    return shapes


def _fits(shape) -> bool:
    return shape[0] % 16 == 0 and shape[1] % 16 == 0


def check_float8_device(cfg, device_type: str) -> None:
    """No float8 hardware on the device the run will use (unless float8_emulate), or no torchao: one line."""
    t = cfg.train
    if not t.float8:
        return
    if not t.float8_emulate:
        if device_type != "cuda":
            raise ConfigError("train.float8: float8 matmuls need a CUDA GPU with compute capability 8.9+ and this "
                              f"run is on {device_type} (train.float8_emulate=true runs torchao's emulation, for tests)")
        cap = torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)))
        if cap < (8, 9):
            raise ConfigError(f"train.float8: this GPU (compute capability {cap[0]}.{cap[1]}) has no float8 "
                              "tensor cores (8.9+: Ada, Hopper, Blackwell); drop train.float8")
    try:
        _torchao_float8()
    except ImportError:
        raise ConfigError("train.float8 needs torchao: pip install torchao") from None


def check_float8_targets(cfg, margs) -> None:
    """Nothing to convert (no block linear with both dims multiples of 16): one line. TP with float8 is refused by
    the config's validation."""
    if cfg.train.float8 and not any(_fits(s) for s in block_linear_shapes(margs).values()):
        raise ConfigError(f"train.float8: no block linear has in and out features that are multiples of 16 "
                          f"({block_linear_shapes(margs)}): nothing to convert")


def float8_flops_per_token(cfg, margs) -> float:
    """Training FLOPs per token of the linears train.float8 converts (6 x their weights; LoRA targets stay)."""
    if not cfg.train.float8:
        return 0.0
    lora = set(cfg.train.lora.targets) if cfg.train.lora.rank else set()
    per_layer = sum(i * o for kind, (i, o) in block_linear_shapes(margs).items() if _fits((i, o)) and kind not in lora)
    return 6.0 * margs.n_layers * per_layer


def _torchao_float8():
    """torchao's float8 API. Without CUDA its CUDA kernels cannot load and torchao logs a warning per file at
    import; emulation does not use them, so that warning is silenced there (on a GPU it stays)."""
    import logging
    if not torch.cuda.is_available():
        logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    return Float8LinearConfig, convert_to_float8_training


def _is_target(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.") and not hasattr(module, "lora_a")
            and _fits((module.in_features, module.out_features)))


def apply_float8(model: nn.Module, recipe: str, emulate: bool, fsdp: bool) -> list[str]:
    """Convert the target linears in place; returns their names."""
    Float8LinearConfig, convert_to_float8_training = _torchao_float8()
    config = Float8LinearConfig.from_recipe_name(recipe)
    all_gather = fsdp and recipe == "tensorwise" and not emulate  # float8 all-gather: NCCL (gloo has no float8)
    config = dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=all_gather)
    names = [fqn for fqn, m in model.named_modules() if _is_target(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=_is_target)
    return names


def converted(model_parts) -> list[str]:
    """Names of the Float8Linear modules in these parts (wrapper prefixes dropped)."""
    return [canonical_name(name) for part in model_parts for name, m in part.named_modules()
            if type(m).__name__ == "Float8Linear"]


def describe_float8(model_parts) -> str:
    """One start-up line: how many linears run in float8, of which kinds (layer index dropped)."""
    names = converted(model_parts)
    return f"float8: {len(names)} linears ({name_kinds(names)})"
