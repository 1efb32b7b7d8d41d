"""The Llama adapter (LlamaForCausalLM): parameter names, state dicts and config.json both ways. Our RoPE already
uses HF's rotate-half layout, so q/k rows need no permutation; w1/w3/w2 are gate/up/down."""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs

MODEL_TYPE = "llama"
LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
         "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
         "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}


QK_NORM = {"attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm"}  # Qwen3


def names(args: ModelArgs) -> dict[str, str]:
    """Our parameter names -> HF's (the tied output weight maps to the embedding, as HF ties it)."""
    out = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"}
    layer = {**LAYER, **(QK_NORM if args.qk_norm else {})}
    for i in range(args.n_layers):
        for ours, hf in layer.items():
            out[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{hf}.weight"
    return out


def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (a tied output weight is omitted, as HF stores it)."""
    return {hf: sd[ours] for ours, hf in names(args).items() if not (ours == "output.weight" and args.tie_embeddings)}


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours: hf[name] for ours, name in names(args).items()}


def config(args: ModelArgs, special: dict, dtype: str) -> dict:
    # rope_theta at top level (transformers 4) and in rope_parameters (transformers 5)
    return {"architectures": ["LlamaForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}, "rms_norm_eps": args.norm_eps,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": args.tie_embeddings, "dtype": dtype, "torch_dtype": dtype, **special}


def args_from_config(c: dict) -> ModelArgs:
    """ModelArgs of a Llama config.json; refuses features our model does not implement."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented "
                         "by llmforge's model; logits would differ")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (llmforge Llama uses {want!r})")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return ModelArgs(family="llama", attn_head_dim=0 if head_dim * heads == c["hidden_size"] else head_dim,
                     dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
                     n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
                     vocab_size=c["vocab_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                     norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False))
