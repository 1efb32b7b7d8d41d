"""Reading a DeepSpeed run's checkpoint: which tag to trust, and its full fp32 weights for eval / generate /
export_hf / init of another run.

A tag (``checkpoints/step_N``) written since the markers existed holds llmforge's ``COMPLETE`` marker (each file's
size and xxh3-64 content hash, engines/deepspeed_ckpt.py); :func:`checked` verifies it before anything is loaded,
under the shared reader lock that rotation respects (llmforge/checkpoint/integrity.py), and :func:`tag_listing`
lists the tags for llmforge.checkpoint.checkpointer.load_newest, so a damaged tag is skipped for the previous one with a warning
naming the file. A tag without a marker that DeepSpeed's ``latest`` names (or a newer one names) was written
before the markers: it still loads, unverified. ZeRO 1-3 checkpoints are consolidated by DeepSpeed's own
``zero_to_fp32`` utilities; ZeRO-0 keeps the whole module in ``mp_rank_00_model_states.pt``; pipeline runs keep one
``layer_XX-model_states.pt`` per PipelineModule layer (embedding | blocks | norm+head, see engines/deepspeed.py),
renamed here to the model's parameter names. Every file is read with ``torch.load(weights_only=True)``
(llmforge.core.safe_pickle), DeepSpeed's own helpers (``zero_to_fp32``, ``load_checkpoint`` on resume) inside
:func:`ds_weights_only`, which allows only the three plain-data classes DeepSpeed pickles; :func:`scan_tag` checks
a whole tag that way first, and a crafted file is refused in one line, never skipped.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys

import torch
import torch.distributed as dist

from llmforge.checkpoint.checkpointer import list_checkpoints, load_newest
from llmforge.checkpoint.integrity import CheckpointError, DamagedCheckpoint, reading, verify
from llmforge.core.params import canonical_name
from llmforge.core.safe_pickle import UnsafePickleError, safe_torch_load, weights_only_loads



class DeepSpeedLoadError(RuntimeError):
    """One printable line naming the checkpoint."""


INTERRUPTED = "no COMPLETE marker, and newer than `latest` (an interrupted save)"


def latest_tag(ckpt_root: str) -> str | None:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_root, tag)) else None


def _latest_step(ckpt_root: str) -> int | None:
    """The step of the tag DeepSpeed's ``latest`` file names (its folder may be gone), None without one."""
    try:
        with open(os.path.join(ckpt_root, "latest")) as f:
            m = re.fullmatch(r"step_(\d+)", f.read().strip())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def is_legacy(path: str) -> bool:
    """A tag saved before the COMPLETE markers existed: no marker, and committed (``latest`` names it or a newer
    tag). Since the markers, a tag only appears under its own name once its marker is written."""
    path = os.path.normpath(path)
    m = re.fullmatch(r"step_(\d+)", os.path.basename(path))
    latest = _latest_step(os.path.dirname(path))
    return (m is not None and latest is not None and int(m.group(1)) <= latest
            and not os.path.lexists(os.path.join(path, "COMPLETE")))


def tag_listing(ckpt_root: str) -> list[tuple[str, str]] | None:
    """Rank 0's tags, newest first, as (path, why it is unusable or ""), the listing llmforge.checkpoint.checkpointer.load_newest
    walks; None when a tag vanished while listed (a running training's rotation renamed it away): the caller lists
    again. Sizes and content are checked when a tag is loaded (:func:`checked`), after its files are scanned, so a
    crafted file is refused as such even where it changed a size."""
    out = []
    for _, path in list_checkpoints(ckpt_root):
        marked = os.path.lexists(os.path.join(path, "COMPLETE"))
        if not os.path.isdir(path):
            return None
        out.append((path, "" if marked or is_legacy(path) else INTERRUPTED))
    return out


def ds_weights_only():
    """A context in which every torch.load (DeepSpeed's own ``weights_only=False`` calls too) is weights-only,
    allowing the only non-tensor classes DeepSpeed pickles into its checkpoint files: an enum, the loss scaler's
    attributes and a (numel, start) record. Plain data, no code: nothing they unpickle can call a function."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return weights_only_loads((ZeroStageEnum, LossScaler, fragment_address))


def scan_tag(path: str) -> tuple[bool, str] | None:
    """(crafted, one line naming the file) for a ``*.pt`` file under the tag dir ``path`` that is not tensors and
    plain data: the first crafted one (it references code), else the first unreadable one; None when all read.
    Memory-mapped: only the pickles are read, not the tensors they point at."""
    unreadable = None
    with ds_weights_only():
        for f in sorted(glob.glob(os.path.join(glob.escape(path), "*.pt"))):
            try:
                safe_torch_load(f, mmap=True)
            except UnsafePickleError as e:
                return True, str(e)
            except (ValueError, OSError) as e:  # garbled, truncated, or gone (rotated away: see checked)
                unreadable = unreadable or (False, str(e) if isinstance(e, ValueError) else f"{f}: unreadable ({e})")
    return unreadable


def scan_checkpoint(path: str) -> str | None:
    """The one-line refusal of a file of the tag that is not tensors and plain data (:func:`scan_tag`), or None."""
    found = scan_tag(path)
    return found[1] if found else None


def _rank0(fn):
    """``fn()`` computed on rank 0 and given to every rank."""
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def checked(path: str):
    """Collective, around loading the tag ``path``: under the shared reader lock (held until the block ends) rank 0
    unpickles every file weights-only (:func:`scan_tag`): a crafted one is refused on every rank with
    DeepSpeedLoadError, never skipped; then every file is checked against the COMPLETE marker (DamagedCheckpoint
    names the first bad or unreadable file; CheckpointVanished if rotation removed the tag first). A tag saved
    before the markers (:func:`is_legacy`) is scanned only. Rank 0's answers are every rank's."""
    legacy = _rank0(lambda: is_legacy(path))
    with contextlib.ExitStack() as stack:
        status = None if legacy else stack.enter_context(reading(path))
        found = _rank0(lambda: scan_tag(path))
        if found and found[0]:
            raise DeepSpeedLoadError(found[1])
        if not legacy:
            verify(path, status)
        if found:
            raise DamagedCheckpoint(found[1])
        yield


def _clean(sd: dict) -> dict:
    """Our plain parameter names (the recompute / compile wrappers' prefixes removed)."""
    return {canonical_name(k): v for k, v in sd.items()}


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


def _warn(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def consolidated_state_dict(ckpt_root: str, n_layers: int, checkpoint: str | None = None,
                            log=_warn) -> tuple[dict, str, int]:
    """(model state dict with the model's parameter names, checkpoint path, step) of ``checkpoint``, or of the
    newest tag that verifies: a damaged one is skipped with a warning naming the file (``log``), and when every
    one is damaged the error names them. Collective over the process group (verification, :func:`checked`)."""
    def read(path: str) -> dict:
        with checked(path):
            return _tag_state_dict(path, n_layers)
    if checkpoint:
        path = os.path.normpath(checkpoint)
        if not os.path.isdir(path):
            raise DeepSpeedLoadError(f"--checkpoint {checkpoint}: not found")
        try:
            sd = read(path)
        except CheckpointError as e:  # damaged, or rotated away
            raise DeepSpeedLoadError(f"--checkpoint {checkpoint}: {e}") from None
    else:
        try:
            path, sd = load_newest(ckpt_root, read, log, listing=tag_listing)
        except CheckpointError as e:  # every tag damaged, or kept being rotated away
            raise DeepSpeedLoadError(str(e)) from None
        if path is None:
            raise DeepSpeedLoadError(f"no complete DeepSpeed checkpoint under {ckpt_root} (train first, or the saves "
                                     "were interrupted)")
    step = _step_of(path, os.path.join(path, "mp_rank_00_model_states.pt"))
    return {k: v.float() for k, v in sd.items()}, path, step


def _tag_state_dict(path: str, n_layers: int) -> dict:
    """The model weights one tag holds, by our parameter names (its files already checked)."""
    root, tag = os.path.split(path)
    try:
        if glob.glob(os.path.join(glob.escape(path), "layer_*-model_states.pt")):
            return _pipeline_state(path, n_layers)
        if glob.glob(os.path.join(glob.escape(path), "*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with ds_weights_only():  # zero_to_fp32 calls torch.load(weights_only=False) itself
                return _clean(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
        return _clean(safe_torch_load(os.path.join(path, "mp_rank_00_model_states.pt"))["module"])
    except (OSError, KeyError, RuntimeError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeepSpeedLoadError(f"cannot read DeepSpeed checkpoint {path}: {first}") from None


def _step_of(path: str, states: str) -> int:
    m = re.search(r"step_(\d+)$", path)
    if m:
        return int(m.group(1))
    if os.path.isfile(states):
        return int(safe_torch_load(states).get("client_state", {}).get("step", 0))
    return 0


def load_into(model: torch.nn.Module, ckpt_root: str, checkpoint: str | None = None, log=_warn) -> tuple[str, int]:
    """Load a DeepSpeed run's weights into an unsharded llmforge model; (checkpoint path, step)."""
    sd, path, step = consolidated_state_dict(ckpt_root, model.args.n_layers, checkpoint, log)
    if model.args.tie_embeddings:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("rope_cos", "rope_sin"))]
    if missing or unexpected:
        raise DeepSpeedLoadError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
    return path, step
