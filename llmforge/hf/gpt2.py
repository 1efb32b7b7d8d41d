"""The GPT-2 adapter (GPT2LMHeadModel): state dicts and config.json both ways. HF uses Conv1D (a weight stored
as (in, out), i.e. transposed) and one fused ``c_attn`` = [q; k; v]."""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs

MODEL_TYPE = "gpt2"
LAYER = {"attention_norm": "ln_1", "ffn_norm": "ln_2", "attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc",
         "feed_forward.w2": "mlp.c_proj"}  # + attn.c_attn (fused q, k, v); Linear weights transposed (Conv1D)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (a tied output weight is omitted, as HF stores it)."""
    out = {}
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [p + f"attention.{w}" for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for ours, hf in LAYER.items():
            w = sd[p + ours + ".weight"]
            out[h + hf + ".weight"] = w.t() if w.dim() == 2 else w
            out[h + hf + ".bias"] = sd[p + ours + ".bias"]
    out["transformer.wte.weight"] = sd["tok_embeddings.weight"]
    out["transformer.wpe.weight"] = sd["pos_embeddings.weight"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return out


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf``; accepts files without the ``transformer.`` prefix."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {}
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"h.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].t().split(args.dim)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].split(args.dim)
        for w, (wt, b) in zip(("wq", "wk", "wv"), ((q, qb), (k, kb), (v, vb))):
            sd[p + f"attention.{w}.weight"], sd[p + f"attention.{w}.bias"] = wt, b
        for ours, name in LAYER.items():
            w = hf[h + name + ".weight"]
            sd[p + ours + ".weight"] = w.t() if w.dim() == 2 else w
            sd[p + ours + ".bias"] = hf[h + name + ".bias"]
    sd["tok_embeddings.weight"], sd["pos_embeddings.weight"] = hf["wte.weight"], hf["wpe.weight"]
    sd["norm.weight"], sd["norm.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
    sd["output.weight"] = sd["tok_embeddings.weight"] if args.tie_embeddings else hf["lm_head.weight"]
    return sd


def config(args: ModelArgs, special: dict, dtype: str) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": MODEL_TYPE, "vocab_size": args.vocab_size,
            "n_positions": args.max_seq_len, "n_embd": args.dim, "n_layer": args.n_layers, "n_head": args.n_heads,
            "n_inner": args.ffn_dim, "activation_function": "gelu_new", "layer_norm_epsilon": args.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": args.tie_embeddings,
            "dtype": dtype, "torch_dtype": dtype, **special}


def args_from_config(c: dict) -> ModelArgs:
    """ModelArgs of a GPT-2 config.json; refuses an activation our model does not implement."""
    if c.get("activation_function", "gelu_new") not in ACTIVATIONS:
        raise ValueError(f"config.json: GPT-2 activation {c['activation_function']!r} is not supported (gelu_new)")
    return ModelArgs(family="gpt2", dim=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
                     n_kv_heads=c["n_head"], ffn_dim=c.get("n_inner") or 4 * c["n_embd"], vocab_size=c["vocab_size"],
                     max_seq_len=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                     tie_embeddings=c.get("tie_word_embeddings", True))
