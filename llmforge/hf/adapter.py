"""One Hugging Face adapter per model family (``llama``, ``qwen3``, ``qwen3_moe``, ``gpt2``: names, state dicts and
config.json both ways), chosen by the model shape (``adapter_of``) or config.json's ``model_type``, and the one
shape check every import uses (the MoE shape included: a dense folder into an MoE model names num_experts). A new
family is one module with the same five names (MODEL_TYPE, to_hf, from_hf, config, args_from_config)."""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs

from . import gpt2, llama, qwen3, qwen3_moe

ADAPTERS = {m.MODEL_TYPE: m for m in (llama, qwen3, qwen3_moe, gpt2)}
SHAPE_KEYS = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings",
              "qk_norm", "head_dim")
MOE_SHAPE_KEYS = ("num_experts", "top_k", "ffn_dim", "norm_topk", "dense_layers", "interval", "shared_experts",
                  "score", "route_scale")


def adapter_of(args: ModelArgs):
    """The adapter of a model shape: Qwen3-MoE for one with experts, Qwen3 for a Llama with q/k norms, else the
    family's."""
    if args.moe.num_experts:
        return qwen3_moe
    return qwen3 if args.qk_norm else ADAPTERS[args.family]


def _moe_shape(args: ModelArgs) -> dict:
    m = args.moe
    return {k: (m.ffn_dim or args.ffn_dim) if k == "ffn_dim" else getattr(m, k) for k in MOE_SHAPE_KEYS}


def shape_diff(want: ModelArgs, got: ModelArgs, keys=SHAPE_KEYS) -> list[str]:
    """``"key: want vs got"`` for each shape key where two model shapes differ (the one check of an HF import);
    MoE keys as ``moe.KEY`` (only ``moe.num_experts`` when one side is dense). The dense ``ffn_dim`` is not
    compared when neither model has a dense block (it sizes nothing)."""
    all_moe = all(a.moe.num_experts and all(a.moe.is_moe_layer(i) for i in range(a.n_layers)) for a in (want, got))
    out = [f"{k}: model {getattr(want, k)} vs {getattr(got, k)}" for k in keys
           if getattr(want, k) != getattr(got, k) and not (k == "ffn_dim" and all_moe)]
    if want.moe.num_experts or got.moe.num_experts:
        w, g = _moe_shape(want), _moe_shape(got)
        moe_keys = MOE_SHAPE_KEYS if w["num_experts"] and g["num_experts"] else ("num_experts",)
        out += [f"moe.{k}: model {w[k]} vs {g[k]}" for k in moe_keys if w[k] != g[k]]
    return out


def llama_names(args: ModelArgs) -> dict[str, str]:
    """Our Llama / Qwen3 (-MoE) parameter names -> HF's (the lazy reader of llmforge.hf.load reads tensors by them;
    a stacked expert weight's name is a per-expert template holding ``{e}``)."""
    return adapter_of(args).names(args)


def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (a tied output weight is omitted, as HF stores it)."""
    return {k: v.detach().contiguous() for k, v in adapter_of(args).to_hf(args, sd).items()}


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names (the inverse of ``to_hf``)."""
    return {k: v.contiguous() for k, v in adapter_of(args).from_hf(args, hf).items()}


def hf_config(args: ModelArgs, special: dict, dtype: str = "float32") -> dict:
    """config.json of the export (``special``: bos/eos/pad token ids)."""
    return adapter_of(args).config(args, special, dtype)


def args_from_hf_config(c: dict) -> ModelArgs:
    """ModelArgs of a config.json; refuses families and features our model does not implement."""
    kind = c.get("model_type")
    if kind not in ADAPTERS:
        raise ValueError(f"config.json: model_type {kind!r} is not supported ({', '.join(ADAPTERS)})")
    return ADAPTERS[kind].args_from_config(c)
