"""Reading a Hugging Face folder (an export of ours, or a Llama / Qwen3 / Qwen3-MoE / GPT-2 folder from the Hub,
already downloaded) into our parameter names: the shape from config.json, the weights from safetensors (sharded
or not) or a ``pytorch_model.bin`` read tensors-only (a crafted pickle is refused in one line). Per-expert
tensors are stacked into our (E, ...) expert weights; the lazy reader reads only the experts and rows asked for."""
from __future__ import annotations

import json
import os

import torch

from llmforge.model.blocks import ModelArgs

from .adapter import SHAPE_KEYS, args_from_hf_config, from_hf, llama_names, shape_diff


def full_shape_keys(args: ModelArgs) -> tuple[str, ...]:
    """What an HF start must match beyond the shape: norm eps, and rope theta (Llama) or positions (GPT-2)."""
    return (*SHAPE_KEYS, "norm_eps", "rope_theta" if args.family == "llama" else "max_seq_len")


def hf_model_args(hf_dir: str) -> ModelArgs:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        return args_from_hf_config(json.load(f))


def _read_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded checkpoint
        files = sorted(set(json.load(open(index))["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}
    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        return load_file(os.path.join(hf_dir, "model.safetensors"))
    if os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        from llmforge.core.safe_pickle import safe_torch_load  # tensors only: a crafted .bin is refused in one line
        return safe_torch_load(os.path.join(hf_dir, "pytorch_model.bin"))
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin")


def import_hf(hf_dir: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, state dict in our names, fp32) from a Llama/GPT-2 Hugging Face folder."""
    args = hf_model_args(hf_dir)
    try:
        sd = from_hf(args, _read_weights(hf_dir))
    except KeyError as e:
        raise ValueError(f"{hf_dir}: weight {e} missing for a {args.family} model of {args.n_layers} layers") from None
    return args, {k: v.float() for k, v in sd.items()}


def load_hf_into(model, hf_dir: str) -> ModelArgs:
    """Copy an HF folder's weights into our (unparallelised) model; its shape must match the folder's config."""
    check_hf_shape(model.args, hf_dir)
    args, sd = import_hf(hf_dir)
    for k, v in model.state_dict().items():  # balance=bias: HF has no expert bias, it starts at zero
        if k.endswith("expert_bias"):
            sd.setdefault(k, torch.zeros_like(v))
    model.load_state_dict(sd, strict=True)
    return args


def check_hf_shape(margs: ModelArgs, hf_dir: str) -> None:
    """A ValueError naming every key where the model and the HF folder's config.json differ."""
    args = hf_model_args(hf_dir)
    diff = shape_diff(margs, args, full_shape_keys(args))
    if diff:
        raise ValueError(f"train.init_from_hf={hf_dir} does not match the model ({'; '.join(diff)})")


class LlamaSafetensorsReader:
    """Reads single HF tensors (and row ranges of them) lazily, by our parameter names: a rank building its
    shards (llmforge.parallel.build) reads only the rows it owns."""

    def __init__(self, hf_dir: str, margs: ModelArgs):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            from safetensors import safe_open
            with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.dir, self.weight_map, self.names = hf_dir, weight_map, llama_names(margs)
        self.num_experts = margs.moe.num_experts

    def _slice(self, hf: str, rows: torch.Tensor | None) -> torch.Tensor:
        from safetensors import safe_open
        if hf not in self.weight_map:
            raise ValueError(f"{self.dir}: weight {hf!r} missing")
        with safe_open(os.path.join(self.dir, self.weight_map[hf]), "pt") as f:
            sl = f.get_slice(hf)
            if rows is None:
                return sl[:]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            return sl[lo:hi][rows - lo]

    def read(self, name: str, idx: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The tensor of our parameter ``name`` restricted to ``idx`` (global indices per dim, as
        llmforge.parallel.build.local_index gives them). A stacked expert weight reads only the experts of
        ``idx[0]`` and, of each, the rows of ``idx[1]``; a plain weight reads only the rows of ``idx[0]``."""
        idx = idx or {}
        hf = self.names[name]
        if "{e}" in hf:  # one HF tensor per expert
            experts = idx[0].tolist() if 0 in idx else range(self.num_experts)
            value = torch.stack([self._slice(hf.format(e=e), idx.get(1)) for e in experts])
            rest = {d: i for d, i in idx.items() if d >= 2}
        else:
            value = self._slice(hf, idx.get(0))
            rest = {d: i for d, i in idx.items() if d >= 1}
        for d, i in rest.items():
            value = value.index_select(d, i)
        return value
