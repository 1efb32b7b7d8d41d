"""The Qwen3-MoE adapter (Qwen3MoeForCausalLM): Qwen3 attention with mixture-of-experts blocks (``model.moe``).
The hub (and transformers' save_pretrained, which fuses experts only at run time) stores one tensor per expert:
``mlp.experts.E.gate_proj/up_proj/down_proj`` are our stacked ``moe.experts.w1[E]/w3[E]/w2[E]``, ``mlp.gate`` is
the router; a dense block of a mixed model is Qwen3's ``mlp.gate_proj/up_proj/down_proj``. Which blocks are MoE
is ``mlp_only_layers`` (the dense ones) and ``decoder_sparse_step``: ours, ``dense_layers`` then every
``interval``-th, is written as the list of dense blocks with step 1, and read back from any layout it can express.

A stacked expert weight's HF name is a template with ``{e}`` (``names``); ``to_hf`` splits it into the per-expert
tensors, ``from_hf`` stacks them, and the lazy reader (llmforge.hf.load) reads only the experts and rows a shard
holds. Qwen3-MoE has no shared experts, sigmoid router, route scale or expert bias: a model using one is refused
on export, naming the key."""
from __future__ import annotations

import torch

from llmforge.model.blocks import ModelArgs
from llmforge.model.moe import MoEArgs

from . import llama, qwen3

MODEL_TYPE = "qwen3_moe"
EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def names(args: ModelArgs) -> dict[str, str]:
    """Our names -> HF's; a stacked expert weight (E, ...) maps to a per-expert template holding ``{e}``."""
    out = llama.names(args)
    for i in range(args.n_layers):
        if not args.moe.is_moe_layer(i):
            continue
        for w in EXPERT:
            out.pop(f"layers.{i}.feed_forward.{w}.weight")
        out[f"layers.{i}.moe.router.gate.weight"] = f"model.layers.{i}.mlp.gate.weight"
        for w, hf in EXPERT.items():
            out[f"layers.{i}.moe.experts.{w}"] = f"model.layers.{i}.mlp.experts.{{e}}.{hf}.weight"
    return out


def check_exportable(args: ModelArgs) -> None:
    """A ValueError naming the first model key that Qwen3MoeForCausalLM cannot express."""
    m = args.moe
    refusals = (("model.qk_norm", not args.qk_norm, "false (Qwen3-MoE has a q/k norm per head)"),
                ("model.moe.shared_experts", m.shared_experts > 0, f"{m.shared_experts} (Qwen3-MoE has no shared "
                                                                   "experts)"),
                ("model.moe.balance", m.balance == "bias", "bias (Qwen3-MoE has no expert bias; its routing "
                                                          "would differ)"),
                ("model.moe.score", m.score != "softmax", f"{m.score} (Qwen3-MoE routes on softmax scores)"),
                ("model.moe.route_scale", m.route_scale != 1.0, f"{m.route_scale} (Qwen3-MoE has no route scale)"))
    for key, bad, why in refusals:
        if bad:
            raise ValueError(f"{key}={why}: this MoE model cannot be exported as Qwen3MoeForCausalLM")


def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names, one tensor per expert (a tied output weight is omitted, as HF stores it)."""
    check_exportable(args)
    out = {}
    for ours, hf in names(args).items():
        if ours == "output.weight" and args.tie_embeddings:
            continue
        if "{e}" in hf:
            out.update({hf.format(e=e): sd[ours][e] for e in range(args.moe.num_experts)})
        else:
            out[hf] = sd[ours]
    return out


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names: the per-expert tensors stacked into (E, F, H) / (E, H, F)."""
    return {ours: torch.stack([hf[name.format(e=e)] for e in range(args.moe.num_experts)]) if "{e}" in name
            else hf[name] for ours, name in names(args).items()}


def config(args: ModelArgs, special: dict, dtype: str) -> dict:
    check_exportable(args)
    m = args.moe
    dense = [i for i in range(args.n_layers) if not m.is_moe_layer(i)]
    return {**qwen3.config(args, special, dtype), "architectures": ["Qwen3MoeForCausalLM"], "model_type": MODEL_TYPE,
            "num_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.ffn_dim or args.ffn_dim, "norm_topk_prob": m.norm_topk,
            "decoder_sparse_step": 1, "mlp_only_layers": dense, "router_aux_loss_coef": m.aux_loss_coef,
            "output_router_logits": False}


def moe_layers_of(c: dict) -> list[int]:
    """The MoE blocks of a Qwen3-MoE config.json, by transformers' rule (Qwen3MoeDecoderLayer)."""
    experts = c.get("num_experts", c.get("num_local_experts", 0))
    step, dense = c.get("decoder_sparse_step", 1) or 1, set(c.get("mlp_only_layers") or [])
    return [i for i in range(c["num_hidden_layers"]) if experts > 0 and i not in dense and (i + 1) % step == 0]


def args_from_config(c: dict) -> ModelArgs:
    """ModelArgs of a Qwen3-MoE config.json; an MoE layout that is not ``dense_layers`` then every
    ``interval``-th block is refused."""
    args = qwen3.args_from_config({**c, "model_type": "qwen3"})
    layers = moe_layers_of(c)
    if not layers:
        return args  # every block dense: a Qwen3 model in Qwen3-MoE's clothes
    n = args.n_layers
    first, interval = layers[0], (layers[1] - layers[0] if len(layers) > 1 else n - layers[0])
    moe = MoEArgs(num_experts=c.get("num_experts", c.get("num_local_experts")), top_k=c["num_experts_per_tok"],
                  ffn_dim=c["moe_intermediate_size"], norm_topk=bool(c.get("norm_topk_prob", False)),
                  aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)), dense_layers=first, interval=interval)
    if [i for i in range(n) if moe.is_moe_layer(i)] != layers:
        raise ValueError(f"config.json: MoE blocks {layers} (mlp_only_layers, decoder_sparse_step) are not "
                         "model.moe.dense_layers leading dense blocks then every model.moe.interval-th")
    args.moe = moe
    return args
