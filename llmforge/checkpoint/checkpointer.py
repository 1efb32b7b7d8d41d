"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, keep-last-K, async, auto-resume.

Layout: ``checkpoints/step_00000010/`` holds the DCP files (model + optimizer, keyed by parameter names so a
checkpoint loads into any parallel layout), ``trainer_state.json`` (step, samples consumed, ...),
``rng-rank{r}.pt`` and ``COMPLETE`` (the size and xxh3-64 content hash of every file, each hashed by the rank
that wrote it). Everything is written under a hidden temporary name first; the rename is the commit point, so a
crash never leaves a loadable half checkpoint. Every load verifies sizes and hashes first (each rank a share of the
files); a marker written before hashes existed vouches for sizes only. Readers hold a shared ``flock`` on
``COMPLETE`` while they load, and rotation keeps a checkpoint a reader holds (it is removed on a later rotation).
The marker, its checks and the locks live in llmforge/checkpoint/integrity.py.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import threading
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from llmforge.core.safe_pickle import (SafeFileSystemReader, UnreadablePickleError, UnsafePickleError, load_metadata,
                                   safe_torch_load)
from llmforge.common.atomic import atomic_path
from llmforge.checkpoint.writer import AsyncWriter, write_dcp
from llmforge.checkpoint.integrity import (CheckpointError, CheckpointVanished, DamagedCheckpoint,  # noqa: F401
                                           NoUsableCheckpoint, is_complete, reading, remove_unless_read, verify,
                                           write_marker)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def _disk_full(e: BaseException, depth: int = 0) -> bool:
    """Whether ``e`` (or what it wraps: causes, DCP's per-rank failures) is ENOSPC / EDQUOT."""
    if depth > 5 or e is None:
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    for inner in getattr(e, "failures", {}).values() if isinstance(getattr(e, "failures", None), dict) else ():
        if _disk_full(inner[0] if isinstance(inner, tuple) else inner, depth + 1):
            return True
    return _disk_full(e.__cause__, depth + 1) or _disk_full(e.__context__, depth + 1)


def _out_of_space(path: str) -> bool:
    """Whether 1 MiB more cannot be written under ``path`` for lack of space or quota. Needed besides the errno:
    torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...")."""
    probe = os.path.join(path, f".space-probe.tmp{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _model_sd(model_parts):
    sd = {}
    for part in model_parts:
        sd.update(get_model_state_dict(part, options=_OPTS))
    return sd


def _local_optim(opt):
    """ZeRO-1: the optimizer over the parameters this rank owns. Its state dict uses the same per-parameter keys as
    an unsharded optimizer, each rank contributing its own keys, so the checkpoint loads into any layout."""
    from llmforge.parallel.data_parallel import local_optimizer
    return local_optimizer(opt)


def _has_params(opt) -> bool:
    """False for the optimizer of a pipeline stage whose parameters are all frozen (train.freeze): no state."""
    return any(len(g["params"]) for g in opt.param_groups)


def _optim_sd(model_parts, optimizers):
    sd = {}
    for part, opt in zip(model_parts, optimizers):
        if _has_params(_local_optim(opt)):
            sd.update(get_optimizer_state_dict(part, _local_optim(opt), options=_OPTS))
    return sd


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _write_atomic(path: str, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:  # closed here, so a write error (disk full) raises now, not at garbage collection
        json.dump(obj, f, indent=1)


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    out = [(int(m.group(1)), os.path.join(ckpt_root, d)) for d in os.listdir(ckpt_root) if (m := _STEP_DIR.match(d))]
    return sorted(out, reverse=True)


def complete_checkpoints(ckpt_root: str, log=print) -> list[str]:
    """Checkpoints whose marker vouches for every file, newest first; others are skipped with a warning."""
    out = []
    for _, path in list_checkpoints(ckpt_root):
        ok, why = is_complete(path)
        if ok:
            out.append(path)
        else:
            log(f"warning: skipping checkpoint {path}: {why}")
    return out


def newest_complete(ckpt_root: str, log=print) -> str | None:
    found = complete_checkpoints(ckpt_root, log)
    return found[0] if found else None


class Checkpointer:
    def __init__(self, ckpt_root: str, keep: int = 2, async_save: bool = False, rank: int = 0):
        self.root, self.keep, self.async_save, self.rank = ckpt_root, keep, async_save, rank
        self._pending = None  # (step, tmp, final) of the async save in flight
        self._async: AsyncWriter | None = None
        self._rotation: threading.Thread | None = None  # a sync save's removal of old checkpoints

    def save(self, step: int, model_parts, optimizers, trainer_state: dict) -> None:
        self.wait()
        final = os.path.join(self.root, f"step_{step:08d}")
        tmp = os.path.join(self.root, f".step_{step:08d}.tmp")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        try:
            self._save(step, tmp, final, model_parts, optimizers, trainer_state)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            self._failed(e, step, tmp, final)

    def _failed(self, e: BaseException, step: int, tmp: str, final: str):
        """A failed save leaves nothing behind (a half-written temp folder would hold the space the next save needs);
        a full disk becomes one line saying what to do, other errors propagate unchanged."""
        full = _disk_full(e) or _out_of_space(self.root)  # probed before the partial save frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(f"disk full while saving checkpoint step {step} to {final} (the partial save was "
                                  f"removed; earlier checkpoints are untouched): free space under "
                                  f"{self.root} and rerun the same command to resume") from None
        raise e

    def _save(self, step: int, tmp: str, final: str, model_parts, optimizers, trainer_state: dict) -> None:
        state = {"model": _model_sd(model_parts), "optim": _optim_sd(model_parts, optimizers)}
        rng, trainer_state = _rng_state(), dict(trainer_state)  # taken now: training goes on during an async write
        if not self.async_save:
            return self._write(step, tmp, final, state, rng, trainer_state, None)
        self._async = self._async or AsyncWriter()  # collective, like every save: its process group
        self._async.submit(state, optimizers, lambda staged, group: self._write(step, tmp, final, staged, rng,
                                                                                trainer_state, group))
        self._pending = (step, tmp, final)

    def _write(self, step: int, tmp: str, final: str, state: dict, rng: dict, trainer_state: dict, group) -> None:
        """Every file of the checkpoint, then its commit; in an async save's background thread, on its ``group``."""
        _write_atomic(os.path.join(tmp, f"rng-rank{dist.get_rank()}.pt"), lambda p: (
            os.makedirs(tmp, exist_ok=True), torch.save(rng, p)))
        digests = write_dcp(state, tmp, group)
        if os.environ.get("LLMFORGE_FAULT") == f"kill_in_save@{step}":  # reliability-harness hook
            os.kill(os.getpid(), 9)
        self._finalize(tmp, final, trainer_state, group, digests)

    def writing(self) -> bool:
        """Whether a save still works in the background: an async write, or a sync save's removal of old ones."""
        return (self._async is not None and self._async.busy()) or (
            self._rotation is not None and self._rotation.is_alive())

    def wait(self) -> None:
        """Finish an async save (every rank must call this at the same point): raise its error, as a sync save
        would have. Also joins the removal of old checkpoints, so their space is free before the next save."""
        if self._rotation is not None:
            self._rotation.join()
            self._rotation = None
        if self._pending is None:
            return
        step, tmp, final = self._pending
        self._pending = None
        try:
            self._async.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._failed(e, step, tmp, final)

    def _finalize(self, tmp: str, final: str, trainer_state: dict, group=None, digests=None) -> None:
        if self.rank == 0:
            _write_atomic(os.path.join(tmp, "trainer_state.json"), lambda p: _dump_json(trainer_state, p))
        write_marker(tmp, group, digests)  # collective: waits for every rank's files; their digests come along
        if self.rank == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            if group is None:  # removing old checkpoints (0.03 s per 100 MB) needs not hold a sync save: see wait
                self._rotation = threading.Thread(target=self._rotate, name="llmforge-rotate")
                self._rotation.start()
            else:  # already off the training thread
                self._rotate()
        dist.barrier(group=group)

    def _rotate(self) -> None:
        """Keep the newest ``keep``; an older one a reader holds (eval of a running training) stays until a later
        rotation finds it free."""
        for _, old in list_checkpoints(self.root)[self.keep:]:
            if not remove_unless_read(old):
                print(f"checkpoint: keeping {old} for now: a reader holds it", flush=True)

    def load(self, path: str, model_parts, optimizers, load_optimizer: bool = True, load_rng: bool = True,
             skip=None) -> dict:
        """Load into the (possibly parallelised) model parts and optimizers; return trainer_state. Inference passes
        ``load_rng=False``: the RNG state matters only to a resumed training run. ``skip(name)``: model entries the
        checkpoint does not hold and that keep their value (LoRA adapters when fine-tuning starts). Collective:
        every file is checked against the COMPLETE marker first (DamagedCheckpoint names the first bad one), under
        a shared lock that keeps rotation from removing the checkpoint meanwhile (CheckpointVanished if it did
        before the lock was taken, or never existed)."""
        with reading(path) as status:
            verify(path, status)
            return self._load(path, model_parts, optimizers, load_optimizer, load_rng, skip)

    def _load(self, path: str, model_parts, optimizers, load_optimizer: bool, load_rng: bool, skip) -> dict:
        # The metadata is a pickle: read it through the allow-list first (a crafted file is refused here, in one
        # line naming it), and let DCP read it the same way, never with plain pickle.load.
        load_metadata(os.path.join(path, ".metadata"))
        state = {"model": {k: v for k, v in _model_sd(model_parts).items() if skip is None or not skip(k)}}
        if load_optimizer:
            state["optim"] = _optim_sd(model_parts, optimizers)
        try:
            dcp.load(state, checkpoint_id=path, storage_reader=SafeFileSystemReader(path))
        except CheckpointException as e:  # DCP wraps each rank's error: a refused or garbled entry becomes one line
            raise _entry_error(e) from None
        for part in model_parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if load_optimizer:
            for part, opt in zip(model_parts, optimizers):
                if _has_params(_local_optim(opt)):
                    set_optimizer_state_dict(part, _local_optim(opt), state["optim"], options=_OPTS)
        rng_file = os.path.join(path, f"rng-rank{dist.get_rank()}.pt")
        if load_rng and os.path.isfile(rng_file):  # a different world size has no RNG state for new ranks: keep the seeded one
            try:
                rng = safe_torch_load(rng_file)
                torch.set_rng_state(rng["torch"])
                if "cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["cuda"])
            except UnsafePickleError:  # a crafted file: already one line naming it and what it references
                raise
            except Exception as e:  # noqa: BLE001 - torch's message advises weights_only=False: never for a checkpoint
                raise CheckpointError(f"{rng_file}: not a readable RNG state (garbled or truncated: "
                                      f"{type(e).__name__})") from None
        state_file = os.path.join(path, "trainer_state.json")
        try:
            with open(state_file) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{state_file}: unreadable ({type(e).__name__}: {e})") from None


def _entry_error(e: CheckpointException) -> BaseException:
    """The error inside DCP's wrapper (every rank gets all ranks' failures, so every rank raises the same): a crafted
    entry stays an UnsafePickleError (refused, never skipped); a garbled one its marker vouched for (a marker
    rewritten to match) is damage, skipped like any other; anything else (a layout mismatch) stays as it was."""
    failures = [f[0] if isinstance(f, tuple) else f for _, f in sorted(e.failures.items())]
    for kind in (UnsafePickleError, UnreadablePickleError):
        found = next((f for f in failures if isinstance(f, kind)), None)
        if found is not None:
            return found if kind is UnsafePickleError else DamagedCheckpoint(str(found))
    return e


def resume_candidates(ckpt_root: str, log=print) -> list[str]:
    """Rank 0 lists the complete checkpoints (newest first) and tells the others, so every rank tries the same.
    A folder holding checkpoints none of which is complete is refused on every rank (NoUsableCheckpoint) and
    nothing is removed: they are the evidence, and a run started over would rotate them away."""
    choice = [_resume_listing(ckpt_root, log) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise NoUsableCheckpoint(choice[0])
    if dist.get_rank() == 0:  # hidden temp dirs without a marker are interrupted saves (or rotations): never loadable
        for p in glob.glob(os.path.join(ckpt_root, ".step_*.tmp")) + glob.glob(os.path.join(ckpt_root,
                                                                                         ".step_*.removing")):
            if p.endswith(".removing") or not os.path.isfile(os.path.join(p, "COMPLETE")):
                warnings.warn(f"removing interrupted checkpoint save {p}")
                shutil.rmtree(p, ignore_errors=True)
    return choice[0]


def _resume_listing(ckpt_root: str, log) -> list[str] | str:
    """Rank 0's candidates, or why resuming must refuse. A hidden temp folder that holds a COMPLETE marker is a save
    that crashed between its marker and its rename: the rename is finished, never the folder removed."""
    for tmp in glob.glob(os.path.join(ckpt_root, ".step_*.tmp")):
        final = os.path.join(ckpt_root, os.path.basename(tmp)[1:-len(".tmp")])
        if os.path.isfile(os.path.join(tmp, "COMPLETE")) and not os.path.exists(final):
            os.rename(tmp, final)
    found = complete_checkpoints(ckpt_root, log)
    present = list_checkpoints(ckpt_root)
    if present and not found:
        why = is_complete(present[0][1])[1]
        return (f"cannot resume: none of the {len(present)} checkpoints in {ckpt_root} is complete (newest "
                f"{present[0][1]}: {why}); nothing was removed: move them away to start over")
    return found


def load_newest(ckpt_root: str, load, log=print, attempts: int = 10, listing=None):
    """A reader's choice (eval, generate, export_hf, train.init_from): ``(path, load(path))`` for the newest complete
    checkpoint that verifies; ``(None, None)`` when none is complete. An incomplete or damaged one is skipped with a
    warning naming the file; when every complete one is damaged, NoUsableCheckpoint. One that a running training
    rotated away between listing and locking means listing again. Collective (``load`` verifies on every rank):
    rank 0's listing is the one every rank walks. ``listing``: another layout's listing in _reader_listing's form
    (DeepSpeed's tags, checkpoint/deepspeed_weights.py)."""
    for _ in range(attempts):
        listed = [(listing or _reader_listing)(ckpt_root) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(listed, src=0)
        if listed[0] is None:
            continue
        damaged = []
        for path, why in listed[0]:
            if why:
                log(f"warning: skipping checkpoint {path}: {why}")
                continue
            try:
                return path, load(path)
            except CheckpointVanished:
                break
            except DamagedCheckpoint as e:
                log(f"warning: skipping checkpoint {path}: {e}")
                damaged.append(str(e))
        else:
            if damaged:
                raise NoUsableCheckpoint(f"no usable checkpoint under {ckpt_root}: every complete one is damaged: "
                                         + "; ".join(damaged))
            return None, None
    raise CheckpointError(f"{ckpt_root}: checkpoints kept being rotated away while loading ({attempts} tries)")


def _reader_listing(ckpt_root: str) -> list[tuple[str, str]] | None:
    """Rank 0: (path, why it is incomplete or "") newest first; None when one vanished while being checked (a
    rotation renamed it away): then the caller lists again rather than report a complete checkpoint incomplete."""
    out = []
    for _, path in list_checkpoints(ckpt_root):
        ok, why = is_complete(path)
        if not ok and not os.path.isdir(path):
            return None
        out.append((path, why))
    return out
