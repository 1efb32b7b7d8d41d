"""Full fp32 weights of a DeepSpeed run's checkpoint, for eval / generate / export_hf / init of a native run.

ZeRO 1-3 checkpoints are consolidated by DeepSpeed's own ``zero_to_fp32`` utilities; ZeRO-0 keeps the whole
module in ``mp_rank_00_model_states.pt``; pipeline runs keep one ``layer_XX-model_states.pt`` per PipelineModule
layer (embedding | blocks | norm+head, see engines/deepspeed.py), renamed here to the model's parameter names.
Every file is read with ``torch.load(weights_only=True)`` (llmforge.safe_pickle), DeepSpeed's own helpers
(``zero_to_fp32``, ``load_checkpoint`` on resume) inside :func:`ds_weights_only`, which allows only the three
plain-data classes DeepSpeed pickles; :func:`scan_checkpoint` checks a whole tag that way before a resume.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from llmforge.safe_pickle import safe_torch_load, weights_only_loads

WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # recompute / compile wrappers add these to names


class DeepSpeedLoadError(RuntimeError):
    """One printable line naming the checkpoint."""


def latest_tag(ckpt_root: str) -> str | None:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_root, tag)) else None


def ds_weights_only():
    """A context in which every torch.load (DeepSpeed's own ``weights_only=False`` calls too) is weights-only,
    allowing the only non-tensor classes DeepSpeed pickles into its checkpoint files: an enum, the loss scaler's
    attributes and a (numel, start) record. Plain data, no code: nothing they unpickle can call a function."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return weights_only_loads((ZeroStageEnum, LossScaler, fragment_address))


def scan_checkpoint(path: str) -> str | None:
    """The one-line refusal of the first ``*.pt`` file under the tag dir ``path`` that is not tensors and plain
    data (None when all are). Memory-mapped: only the pickles are read, not the tensors they point at."""
    with ds_weights_only():
        for f in sorted(glob.glob(os.path.join(path, "*.pt"))):
            try:
                safe_torch_load(f, mmap=True)
            except ValueError as e:  # UnsafePickleError, or unreadable: one line naming the file
                return str(e)
    return None


def _clean(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for w in WRAPPERS:
            k = k.replace(w, "")
        out[k.removeprefix("module.")] = v
    return out


def _pipeline_state(path: str, n_layers: int) -> dict:
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "layer_*-model_states.pt"))):
        idx = int(re.search(r"layer_(\d+)-", os.path.basename(f)).group(1))
        part = safe_torch_load(f)
        for k, v in _clean(part).items():
            if 1 <= idx <= n_layers:
                sd[f"layers.{idx - 1}.{k.removeprefix('block.')}"] = v
            else:
                sd[k] = v
    return sd


def consolidated_state_dict(ckpt_root: str, n_layers: int, checkpoint: str | None = None) -> tuple[dict, str, int]:
    """(model state dict with the model's parameter names, checkpoint path, step)."""
    tag = os.path.basename(checkpoint.rstrip("/")) if checkpoint else latest_tag(ckpt_root)
    root = os.path.dirname(checkpoint.rstrip("/")) if checkpoint else ckpt_root
    if tag is None or not os.path.isdir(os.path.join(root, tag)):
        raise DeepSpeedLoadError(f"no complete DeepSpeed checkpoint under {ckpt_root} (no `latest` tag)")
    path = os.path.join(root, tag)
    states = os.path.join(path, "mp_rank_00_model_states.pt")
    try:
        if glob.glob(os.path.join(path, "layer_*-model_states.pt")):
            sd = _pipeline_state(path, n_layers)
        elif glob.glob(os.path.join(path, "*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with ds_weights_only():  # zero_to_fp32 calls torch.load(weights_only=False) itself
                sd = _clean(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
        else:
            sd = _clean(safe_torch_load(states)["module"])
        step = _step_of(path, states)
    except (OSError, KeyError, RuntimeError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeepSpeedLoadError(f"cannot read DeepSpeed checkpoint {path}: {first}") from None
    return {k: v.float() for k, v in sd.items()}, path, step


def _step_of(path: str, states: str) -> int:
    m = re.search(r"step_(\d+)$", path)
    if m:
        return int(m.group(1))
    if os.path.isfile(states):
        return int(safe_torch_load(states).get("client_state", {}).get("step", 0))
    return 0


def load_into(model: torch.nn.Module, ckpt_root: str, checkpoint: str | None = None) -> tuple[str, int]:
    """Load a DeepSpeed run's weights into an unsharded llmforge model; (checkpoint path, step)."""
    sd, path, step = consolidated_state_dict(ckpt_root, model.args.n_layers, checkpoint)
    if model.args.tie_embeddings:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("rope_cos", "rope_sin"))]
    if missing or unexpected:
        raise DeepSpeedLoadError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
    return path, step



