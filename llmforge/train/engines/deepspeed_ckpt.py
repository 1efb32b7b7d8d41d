"""Checkpoints of ``engine: deepspeed``: DeepSpeed's own layout, vouched for by llmforge's COMPLETE marker.

Save: every rank writes its files with ``engine.save_checkpoint`` into the hidden tag folder
``checkpoints/.step_N.tmp`` (the paths DeepSpeed's checkpoint engine writes for each rank are recorded), then
``write_marker`` (llmforge/checkpoint/integrity.py) has each rank hash the files it wrote and rank 0, once every
rank has finished, writes ``COMPLETE`` atomically (each file's size and xxh3-64 hash). Rank 0 renames the folder to
``step_N`` (the commit point), points DeepSpeed's ``latest`` at it and removes tags beyond ``checkpoint.keep``
unless a reader holds them. The folder stays what DeepSpeed writes and reads (``load_checkpoint(root, tag)``,
``zero_to_fp32``); ``COMPLETE`` is one more file beside its own.

Resume: the newest tag that verifies (checkpoint/deepspeed_weights.py ``checked``: a crafted file refuses the resume,
a damaged or unreadable one is skipped for the previous tag with a warning naming the file). When the run dir
holds tags and none is usable the resume is refused in one line naming them, and nothing is removed. Tags written
before the markers (no COMPLETE, at or below ``latest``) still load, unverified.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil

import torch.distributed as dist

from llmforge.checkpoint.checkpointer import list_checkpoints
from llmforge.checkpoint.integrity import DamagedCheckpoint, remove_unless_read, write_marker
from llmforge.common.atomic import write_text
from llmforge.core.config import ConfigError

from .base import TrainingError
from llmforge.checkpoint.deepspeed_weights import INTERRUPTED, DeepSpeedLoadError, checked, ds_weights_only, tag_listing


class RefusedCheckpoint(ConfigError):
    """A checkpoint refused on resume. Every rank raises it and rank 0 alone prints it, as for a ConfigError;
    the run is fine and its checkpoint is not, so the exit status is 1 (a runtime refusal), not 2."""
    exit_status = 1


@contextlib.contextmanager
def _recording(checkpoint_engine):
    """The paths this rank's DeepSpeed checkpoint engine writes inside the block (every file of a tag goes through
    its ``save``: model states, ZeRO shards, pipeline layers)."""
    original, written = checkpoint_engine.save, []

    def save(state_dict, path, *args, **kwargs):
        out = original(state_dict, path, *args, **kwargs)
        written.append(os.path.abspath(path))
        return out
    checkpoint_engine.save = save
    try:
        yield written
    finally:
        checkpoint_engine.save = original


def save(engine, root: str, step: int, state: dict, keep: int, rank: int) -> None:
    tag = f"step_{step:08d}"
    tmp, final = os.path.join(root, f".{tag}.tmp"), os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with _recording(engine.checkpoint_engine) as written:
        engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state=dict(state), save_latest=False)
    inside = os.path.abspath(tmp) + os.sep
    write_marker(tmp, files=sorted({p for p in written if p.startswith(inside)}))  # collective: after every write
    if rank == 0:
        if os.path.exists(final):  # the same step saved again (a stop right after its interval save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text(os.path.join(root, "latest"), tag)  # DeepSpeed's own pointer, for its tools
        for _, old in [c for c in list_checkpoints(root) if c[0] <= step][keep:]:
            if not remove_unless_read(old):
                print(f"checkpoint: keeping {old} for now: a reader holds it", flush=True)
    dist.barrier()


def _resume_listing(root: str) -> list[tuple[str, str]]:
    """Rank 0: a hidden folder whose marker exists is a save that crashed before its rename: finish it. Then the
    tags, newest first, as (path, why it is unusable or ""); interrupted saves are not checkpoints."""
    for tmp in glob.glob(os.path.join(glob.escape(root), ".step_*.tmp")):
        final = os.path.join(root, os.path.basename(tmp)[1:-len(".tmp")])
        if os.path.isfile(os.path.join(tmp, "COMPLETE")) and not os.path.exists(final):
            os.rename(tmp, final)
    return [(path, why) for path, why in tag_listing(root) or [] if why != INTERRUPTED]


def _remove_interrupted(root: str, log) -> None:
    """Once resuming is decided: interrupted saves (hidden folders, or tags of older versions newer than latest)
    and interrupted removals (rotation renames a tag to ``.step_N.removing`` before deleting it)."""
    for path, why in tag_listing(root) or []:
        if why == INTERRUPTED:
            log(f"warning: removing interrupted DeepSpeed checkpoint {path}")
            shutil.rmtree(path, ignore_errors=True)
    for pattern in (".step_*.tmp", ".step_*.removing"):
        for path in glob.glob(os.path.join(glob.escape(root), pattern)):
            shutil.rmtree(path, ignore_errors=True)


def resume(engine, root: str, rank: int, log) -> tuple[int, int, str | None]:
    """(step, samples, tag path) of the newest tag that verifies and loads, or (0, 0, None) when there is none."""
    listing = [_resume_listing(root) if rank == 0 and os.path.isdir(root) else None]
    dist.broadcast_object_list(listing, src=0)
    reasons = []
    for path, why in listing[0] or []:
        if not why:
            try:
                with checked(path), ds_weights_only():  # DeepSpeed's checkpoint engine calls torch.load itself
                    loaded, client = engine.load_checkpoint(root, tag=os.path.basename(path))
            except DeepSpeedLoadError as e:  # a crafted file: refused, never skipped for an older tag
                raise RefusedCheckpoint(f"cannot resume from {path}: {e}; move the checkpoint away to start "
                                        "over") from None
            except DamagedCheckpoint as e:
                why = str(e)
            else:
                if loaded is None:
                    raise TrainingError(f"DeepSpeed could not load checkpoint {path}")
                if rank == 0:
                    _remove_interrupted(root, log)
                dist.barrier()
                return int(client["step"]), int(client["samples"]), path
        log(f"warning: skipping checkpoint {path}: {why}")
        reasons.append(why if why.startswith(path) else f"{path}: {why}")
    if reasons:  # the evidence stays: a run started over would rotate it away
        raise RefusedCheckpoint(f"cannot resume: no checkpoint in {root} is usable ({'; '.join(reasons)}); "
                                "nothing was removed: move them away to start over")
    if rank == 0 and listing[0] is not None:
        _remove_interrupted(root, log)
    dist.barrier()
    return 0, 0, None
