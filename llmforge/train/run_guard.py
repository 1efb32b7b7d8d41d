"""What keeps a run dir from being lost or silently corrupted: training only into a folder llmforge owns (a
marker), one trainer per run dir (a lock), a resume that refuses inputs which changed under it (a fingerprint that
holds what the data is, not only where it lies), and a graceful stop on SIGTERM/SIGUSR1 (preemption).

All checks run on every rank before anything in the run dir is written, so a refused start leaves the run dir
exactly as it was; the ownership check runs before any collective, the resume check right after the lock.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import time

from llmforge.core.config import ConfigError
from llmforge.common.atomic import write_json

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "stopped on a signal after saving; rerun (requeue) to resume"
LOCK_NAME = ".llmforge.lock"
RUN_MARKER = ".llmforge-run"  # written into every run dir llmforge trains in (as the pipeline's .llmforge-data)
# What a run dir written before the marker existed holds besides config.yaml (see _is_older_run)
RUN_EVIDENCE = ("fingerprint.json", "metrics.jsonl", "checkpoints", LOCK_NAME)


# ------------------------------------------------------------------------------------------------ ownership
def _is_older_run(run_dir: str, names: list[str]) -> bool:
    """A run dir from before the marker: llmforge's config.yaml (a mapping with model/train/data sections) beside
    one of the files only llmforge writes there. A user's own config.yaml with a loss.png is not one."""
    if "config.yaml" not in names or not set(RUN_EVIDENCE) & set(names):
        return False
    import yaml
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in ("model", "train", "data"))


def check_run_dir_owner(run_dir: str) -> None:
    """Train only into a new folder, an empty one, or one llmforge made (marker, or an older llmforge run dir);
    a folder holding the user's own files is refused in one line, untouched. Every rank, before any collective."""
    if not os.path.isdir(run_dir) or os.path.isfile(os.path.join(run_dir, RUN_MARKER)):
        return  # absent (created by the lock), or not a folder (the lock says why in one line)
    try:
        everything = os.listdir(run_dir)
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir}: cannot read it ({e.strerror or e})") from None
    names = sorted(n for n in everything if n != LOCK_NAME)  # a lock alone: a start cut short
    if not names or _is_older_run(run_dir, everything):
        return
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise ConfigError(f"run_dir {run_dir} is not empty and was not written by llmforge (it holds {shown}): choose "
                      f"a new or empty folder (llmforge marks the run dirs it writes with {RUN_MARKER})")


def mark_run_dir(run_dir: str) -> None:
    """Rank 0, once the start is accepted: the folder is an llmforge run dir from now on (older ones adopted)."""
    path = os.path.join(run_dir, RUN_MARKER)
    if not os.path.isfile(path):
        write_json(path, {"written_by": "llmforge.train"})


# ------------------------------------------------------------------------------------------------ the lock
class RunLock:
    """An exclusive ``flock`` on ``run_dir/.llmforge.lock``, held by rank 0 for the life of the process. The kernel
    drops it when the process dies (kill -9 included), so a crash never leaves a stale lock behind."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        run_dir = os.path.dirname(self.path)
        self.created = not os.path.isdir(run_dir)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"run_dir {run_dir} is a file, not a folder: choose a new or empty folder")
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # under a regular file, read-only, ...
            raise ConfigError(f"run_dir {run_dir}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run_dir {os.path.dirname(self.path)} is in use by {holder}; wait for it to finish, "
                              f"stop it, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                     f"({' '.join(sys.argv[:2])})".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        run_dir = os.path.dirname(self.path)
        if self.created and os.listdir(run_dir) == [LOCK_NAME]:  # a start that failed before writing anything
            os.remove(self.path)
            os.rmdir(run_dir)
        os.close(self.fd)  # closing drops the flock; an existing run's lock file stays (no race with a new holder)
        self.fd = None


# ------------------------------------------------------------------------------------------------ fingerprint
def file_sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SAMPLE_WINDOW = 64 << 10  # bytes per sampled window of a .bin
SAMPLE_WINDOWS = 16       # windows per .bin (first and last included): 1 MiB read per shard however large it is
_IDENTITY_CACHE: dict[tuple, dict] = {}  # rank 0 fingerprints twice on resume (check, then write)


def _xxh3_file(path: str, windows: int | None = None) -> str:
    """xxh3-128 of a file: all of it, or ``windows`` evenly spaced SAMPLE_WINDOW-byte windows (with their offsets)."""
    import xxhash
    h, size = xxhash.xxh3_128(), os.path.getsize(path)
    with open(path, "rb") as f:
        if windows is None or size <= windows * SAMPLE_WINDOW:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return h.hexdigest()
        step = (size - SAMPLE_WINDOW) / (windows - 1)
        for i in range(windows):
            offset = int(i * step)
            f.seek(offset)
            h.update(offset.to_bytes(8, "little") + f.read(SAMPLE_WINDOW))
    return h.hexdigest()


def shard_identity(prefix: str) -> dict:
    """What one shard is: its .bin size, a hash of its whole .idx (document lengths: every boundary) and a sampled
    hash of its .bin (cheap on TB data). A rebuild shows in the .idx (other lengths) or in a sample; tokens rewritten
    in place with the same lengths show only where a window covers them (all of a .bin up to 1 MiB)."""
    st = [os.stat(prefix + ext) for ext in (".bin", ".idx")]
    key = (prefix,) + tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in st)
    if key not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[key] = {"bin_bytes": st[0].st_size, "idx_xxh3": _xxh3_file(prefix + ".idx"),
                                "bin_sampled_xxh3": _xxh3_file(prefix + ".bin", SAMPLE_WINDOWS)}
    return _IDENTITY_CACHE[key]


def data_identity(paths: list[str]) -> dict:
    """shard prefix (absolute) -> shard_identity, for every train/valid shard of data.paths and its SFT loss mask."""
    from llmforge.common.chat import MASK_DIR
    from llmforge.data.streams import _shard_prefixes
    out = {}
    for p in paths:
        for prefix in _shard_prefixes(p, "train") + _shard_prefixes(p, "valid"):
            prefix = os.path.abspath(prefix)
            mask = os.path.join(os.path.dirname(os.path.dirname(prefix)), MASK_DIR, os.path.basename(prefix))
            for q in (prefix, mask) if os.path.isfile(mask + ".bin") else (prefix,):
                out[q] = shard_identity(q)
    return out


def fingerprint(cfg, plan) -> dict:
    """Everything that must not change when a run resumes: the model shape (LoRA adapters included), the sequence
    length, the tokenizer (by content), the data blend and its weights, SFT packing, what each shard holds
    (data_identity), the seed and the data backend."""
    m = plan.margs
    fp = {f"model.{k}": getattr(m, k) for k in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                 "vocab_size", "rope_theta", "norm_eps", "tie_embeddings")}
    if m.rope_scaling.type != "none":  # only when set: the fingerprints of unscaled runs stay as they were
        fp["model.rope_scaling"] = dataclasses.asdict(m.rope_scaling)
    fp.update({"data.seq_len": cfg.data.seq_len, "data.backend": cfg.data.backend, "seed": cfg.seed,
               "data.paths": [os.path.abspath(os.path.expanduser(p)) for p in cfg.data.paths],
               "data.weights": cfg.data.weights, "sft.pack": cfg.sft.pack, "tokenizer": file_sha256(plan.tok_path),
               "data.shards": data_identity(list(cfg.data.paths))})
    lora = cfg.train.lora  # the adapters are part of the model (their shapes are in the checkpoints)
    fp.update({"train.lora.rank": lora.rank, "train.lora.alpha": lora.alpha,
               "train.lora.targets": sorted(lora.targets)})
    return fp


MAY_CHANGE = ("train.", "parallel.", "checkpoint.", "logging.", "dist.", "recompute", "engine", "deepspeed")


def _has_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step_"))


def check_run_dir(cfg, plan, log) -> None:
    """Refuse a start that would mix two runs or resume on changed inputs; one line naming the key."""
    steps = _has_checkpoints(cfg.run_dir)
    if steps and not cfg.checkpoint.resume:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds checkpoints ({steps[-1]}) and checkpoint.resume="
                          "false: choose a new run_dir or move the old checkpoints away (runs are never mixed)")
    path = os.path.join(cfg.run_dir, "fingerprint.json")
    if not steps or not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = fingerprint(cfg, plan)
    for key, value in new.items():
        if key == "data.shards" and key in old:
            _check_shards(cfg.run_dir, old[key], value)
        elif key in old and old[key] != value:
            what = "the tokenizer file changed (sha256 " if key == "tokenizer" else f"{key} changed ("
            raise ConfigError(f"cannot resume {cfg.run_dir}: {what}{_short(old[key])} -> {_short(value)}); {KEEP}")
    if "data.shards" not in old:  # written before shard contents were recorded: recorded now, checked from now on
        log(f"resume: {path} predates shard content hashes; the shards are not verified this time, and are "
            "recorded for the next resume")
    _log_changes(cfg, log)


KEEP = "it must not change within a run: restore it, or start a new run_dir (train.init_from to keep the weights)"


def _check_shards(run_dir: str, old: dict, new: dict) -> None:
    """A data folder rebuilt in place (same paths, other tokens), or shards added/removed: one line naming one."""
    for prefix in sorted(set(old) | set(new)):
        a, b = old.get(prefix), new.get(prefix)
        if a == b:
            continue
        if a is None or b is None:
            what = "is new" if a is None else "is gone"
        elif a.get("bin_bytes") != b["bin_bytes"]:
            what = f"changed ({a.get('bin_bytes')} -> {b['bin_bytes']} bytes of .bin)"
        else:
            what = "changed (" + ("its .idx differs" if a.get("idx_xxh3") != b["idx_xxh3"] else
                                  "its .bin tokens differ") + " from when the run started)"
        raise ConfigError(f"cannot resume {run_dir}: data shard {prefix} {what}; {KEEP}")


def _short(v):
    return v[:12] if isinstance(v, str) and len(v) == 64 else v


def _log_changes(cfg, log) -> None:
    """Keys that may change on resume (lr, steps, intervals, layout...) are allowed; say which did."""
    import yaml
    from llmforge.core.config import to_dict
    path = os.path.join(cfg.run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = yaml.safe_load(f) or {}

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "deepspeed":
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    old_flat, new_flat = dict(flat(old)), dict(flat(to_dict(cfg)))
    for key, value in new_flat.items():
        if key in old_flat and old_flat[key] != value and key.startswith(MAY_CHANGE):
            log(f"resume: {key} changed {old_flat[key]!r} -> {value!r}")


def write_fingerprint(cfg, plan) -> None:
    """Rank 0, once the start is accepted: the run dir's marker and what a resume must find unchanged."""
    mark_run_dir(cfg.run_dir)
    write_json(os.path.join(cfg.run_dir, "fingerprint.json"), fingerprint(cfg, plan), sort_keys=False)


# ------------------------------------------------------------------------------------------------ preemption
class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; the Trainer finishes the current step, saves and exits PREEMPTED_EXIT."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """Under torchrun: get SIGTERM when the agent dies (its process group killed), so no orphaned worker keeps
    training and writing into run_dir; the StopSignal handler then saves and exits."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the agent is already gone
        os.kill(os.getpid(), signal.SIGTERM)
