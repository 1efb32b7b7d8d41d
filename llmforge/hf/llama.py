"""The Llama adapter (LlamaForCausalLM): parameter names, state dicts and config.json both ways. Our RoPE already
uses HF's rotate-half layout, so q/k rows need no permutation; w1/w3/w2 are gate/up/down."""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs, RopeScaling

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


# our model.rope_scaling keys -> transformers' rope parameters
HF_ROPE_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                "original_max_seq_len": "original_max_position_embeddings", "beta_fast": "beta_fast",
                "beta_slow": "beta_slow"}
ROPE_USES = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
             "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow")}


def rope_config(args: ModelArgs) -> dict:
    """rope_theta at top level (transformers 4) and in rope_parameters (transformers 5); a scaled RoPE also as
    rope_scaling (what transformers 4 reads)."""
    s = args.rope_scaling
    if s.type == "none":
        return {"rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}}
    params = {"rope_type": s.type}
    for key in ROPE_USES[s.type]:
        value = getattr(s, key) or {"beta_fast": 32.0, "beta_slow": 1.0}.get(key)
        params[HF_ROPE_KEYS[key]] = int(value) if key == "original_max_seq_len" else float(value)
    return {"rope_theta": args.rope_theta, "rope_parameters": {**params, "rope_theta": args.rope_theta},
            "rope_scaling": params}


def config(args: ModelArgs, special: dict, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "max_position_embeddings": args.max_seq_len, **rope_config(args), "rms_norm_eps": args.norm_eps,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": args.tie_embeddings, "dtype": dtype, "torch_dtype": dtype, **special}


def rope_scaling_from_config(c: dict) -> RopeScaling:
    """Our RopeScaling of config.json's rope_parameters (transformers 5) or rope_scaling (4): default, llama3 or yarn
    with transformers' defaults (original_max_position_embeddings: max_position_embeddings; YaRN factor: their
    ratio); other types, and YaRN options our model does not implement, are refused."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in ROPE_USES:
        raise ValueError(f"config.json: RoPE scaling {kind!r} is not implemented by llmforge's model (default, "
                         "llama3, yarn); logits would differ")
    if kind == "yarn":
        for key, ok in (("attention_factor", None), ("mscale", None), ("mscale_all_dim", None), ("truncate", True)):
            if rope.get(key, ok) != ok:
                raise ValueError(f"config.json: YaRN {key}={rope[key]!r} is not implemented by llmforge's model "
                                 "(transformers' default attention factor, truncated correction range)")
    original = rope.get("original_max_position_embeddings") or c.get("original_max_position_embeddings") or \
        c.get("max_position_embeddings", 2048)
    factor = rope.get("factor")
    if factor is None and kind == "yarn":
        factor = c.get("max_position_embeddings", 2048) / original
    out = RopeScaling(type=kind, factor=float(factor or 0), original_max_seq_len=int(original))
    for key in ("low_freq_factor", "high_freq_factor") if kind == "llama3" else ("beta_fast", "beta_slow"):
        setattr(out, key, float(rope.get(key) or 0))
    if out.missing():
        raise ValueError(f"config.json: RoPE scaling {kind!r} lacks {HF_ROPE_KEYS[out.missing()[0]]}")
    return out


def args_from_config(c: dict) -> ModelArgs:
    """ModelArgs of a Llama config.json; refuses features our model does not implement."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    scaling = rope_scaling_from_config(c)
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
                     norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False),
                     rope_scaling=scaling)
