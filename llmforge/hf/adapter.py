"""The Hugging Face adapter of our two model families (Llama, GPT-2): parameter names, state-dict conversion both
ways, config.json both ways and the one shape check every import uses.

Name mapping. Llama: our RoPE already uses HF's rotate-half layout, so q/k rows need no permutation; w1/w3/w2 are
gate/up/down. GPT-2: HF uses Conv1D (weight stored as (in, out), i.e. transposed) and one fused c_attn = [q; k; v].
"""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs

LLAMA_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
               "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
GPT2_LAYER = {"attention_norm": "ln_1", "ffn_norm": "ln_2", "attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc",
              "feed_forward.w2": "mlp.c_proj"}  # + attn.c_attn (fused q, k, v); Linear weights transposed (Conv1D)


SHAPE_KEYS = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings")


def shape_diff(want: ModelArgs, got: ModelArgs, keys=SHAPE_KEYS) -> list[str]:
    """``"key: want vs got"`` for each shape key where two model shapes differ (the one check of an HF import)."""
    return [f"{k}: model {getattr(want, k)} vs {getattr(got, k)}" for k in keys if getattr(want, k) != getattr(got, k)]


def llama_names(args: ModelArgs) -> dict[str, str]:
    """Our Llama parameter names -> HF's (the tied output weight maps to the embedding, as HF ties it)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"}
    for i in range(args.n_layers):
        for ours, hf in LLAMA_LAYER.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{hf}.weight"
    return names


# ------------------------------------------------------------------------------------------------ state dicts
def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (tied output weight omitted, as HF stores it)."""
    out = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if args.family == "llama":
            for ours, hf in LLAMA_LAYER.items():
                out[f"model.layers.{i}.{hf}.weight"] = sd[p + ours + ".weight"]
            continue
        h = f"transformer.h.{i}."
        qkv = [p + f"attention.{w}" for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for ours, hf in GPT2_LAYER.items():
            w = sd[p + ours + ".weight"]
            out[h + hf + ".weight"] = w.t() if w.dim() == 2 else w
            out[h + hf + ".bias"] = sd[p + ours + ".bias"]
    if args.family == "llama":
        out["model.embed_tokens.weight"] = sd["tok_embeddings.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    else:
        out["transformer.wte.weight"] = sd["tok_embeddings.weight"]
        out["transformer.wpe.weight"] = sd["pos_embeddings.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names (the inverse of ``to_hf``; accepts GPT-2 files without the transformer. prefix)."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if args.family == "llama":
            for ours, name in LLAMA_LAYER.items():
                sd[p + ours + ".weight"] = hf[f"model.layers.{i}.{name}.weight"]
            continue
        h = f"h.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].t().split(args.dim)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].split(args.dim)
        for w, (wt, b) in zip(("wq", "wk", "wv"), ((q, qb), (k, kb), (v, vb))):
            sd[p + f"attention.{w}.weight"], sd[p + f"attention.{w}.bias"] = wt, b
        for ours, name in GPT2_LAYER.items():
            w = hf[h + name + ".weight"]
            sd[p + ours + ".weight"] = w.t() if w.dim() == 2 else w
            sd[p + ours + ".bias"] = hf[h + name + ".bias"]
    if args.family == "llama":
        sd["tok_embeddings.weight"], sd["norm.weight"] = hf["model.embed_tokens.weight"], hf["model.norm.weight"]
    else:
        sd["tok_embeddings.weight"], sd["pos_embeddings.weight"] = hf["wte.weight"], hf["wpe.weight"]
        sd["norm.weight"], sd["norm.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
    sd["output.weight"] = sd["tok_embeddings.weight"] if args.tie_embeddings else hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ configs
def hf_config(args: ModelArgs, special: dict, dtype: str = "float32") -> dict:
    if args.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": args.vocab_size,
                "n_positions": args.max_seq_len, "n_embd": args.dim, "n_layer": args.n_layers, "n_head": args.n_heads,
                "n_inner": args.ffn_dim, "activation_function": "gelu_new", "layer_norm_epsilon": args.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": args.tie_embeddings,
                "dtype": dtype, "torch_dtype": dtype, **special}
    # rope_theta at top level (transformers 4) and in rope_parameters (transformers 5)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}, "rms_norm_eps": args.norm_eps,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": args.tie_embeddings, "dtype": dtype, "torch_dtype": dtype, **special}


def args_from_hf_config(c: dict) -> ModelArgs:
    """ModelArgs for a Llama/GPT-2 config.json; refuses features our model does not implement."""
    kind = c.get("model_type")
    if kind == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json: GPT-2 activation {c['activation_function']!r} is not supported (gelu_new)")
        return ModelArgs(family="gpt2", dim=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
                         n_kv_heads=c["n_head"], ffn_dim=c.get("n_inner") or 4 * c["n_embd"], vocab_size=c["vocab_size"],
                         max_seq_len=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=c.get("tie_word_embeddings", True))
    if kind != "llama":
        raise ValueError(f"config.json: model_type {kind!r} is not supported (llama, gpt2)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented "
                         "by llmforge's model; logits would differ")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (llmforge Llama uses {want!r})")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ValueError(f"config.json: head_dim={c['head_dim']} != hidden_size / num_attention_heads")
    return ModelArgs(family="llama", dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
                     n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
                     vocab_size=c["vocab_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                     norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False))
