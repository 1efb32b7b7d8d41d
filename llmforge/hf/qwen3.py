"""The Qwen3 adapter (Qwen3ForCausalLM): a Llama with an RMSNorm on each query and key head (``model.qk_norm``)
and, in the published sizes, a head width other than hidden / heads (``model.head_dim``). Names and state dicts
are Llama's plus ``self_attn.q_norm`` / ``k_norm``."""
from __future__ import annotations

from llmforge.model.blocks import ModelArgs

from . import llama

MODEL_TYPE = "qwen3"
to_hf, from_hf, names = llama.to_hf, llama.from_hf, llama.names


def config(args: ModelArgs, special: dict, dtype: str) -> dict:
    return {**llama.config(args, special, dtype), "architectures": ["Qwen3ForCausalLM"], "model_type": MODEL_TYPE,
            "use_sliding_window": False, "sliding_window": None}


def args_from_config(c: dict) -> ModelArgs:
    """ModelArgs of a Qwen3 config.json (sliding-window attention is refused: our attention is full causal)."""
    if c.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported (llmforge attention is full causal)")
    args = llama.args_from_config({**c, "model_type": "llama"})
    args.qk_norm = True
    return args
