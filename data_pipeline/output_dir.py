"""The output folder the pipeline owns, and the input fingerprint that decides whether a rerun resumes.

Ownership: the first run writes ``<output_dir>/.llmforge-data`` (which also records whether the run created the
folder). A failed run removes only what the pipeline wrote (the files its manifest lists, manifest.py; then the
marker) and the folder itself only if a run created it and nothing else is left; a non-empty folder without the
marker (the user's own files) is refused in one line before anything is written, and so is an output_dir that
contains an input or lies inside an input folder (a rerun would read its own outputs, a start-over delete inputs).

Fingerprint: inputs are identified by a content hash (xxh3-128 over the bytes), not size + mtime: a file whose
content changed with the same size and mtime is noticed. Hashes are cached in ``work/input_hashes.json`` keyed by
(device, inode, size, mtime, ctime); ctime changes on every write and cannot be set back by ``touch``, so a cache
hit never hides an edit. The tokenizer file given by ``tokenizer.model_path`` is hashed the same way.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import os
import shutil
import time

import xxhash

from llmforge.common.typed_config import ConfigError

from .atomic_io import read_json, write_json
from .executor import PipelineError
from .manifest import remove_listed
from .readers import _is_hf_disk
from .work_dirs import WORK, fingerprint_file, hash_cache_file, work_dir

OWNER_FILE = ".llmforge-data"
LOCK_FILE = ".llmforge-data.lock"  # empty; flock'ed while a run uses the folder (the kernel drops it on any exit)
LOCK_GRACE_S = 3.0  # how long a busy lock is retried before the run is refused
_HELD: dict[str, int] = {}  # output folder -> fd holding its lock in this process


class OutputDirError(PipelineError):
    """output_dir unusable (a file, under a file, read-only, full, or someone else's folder): nothing of ours to
    remove, so the folder is never touched after it."""

    keep_work = True


def os_error(out: str, e: OSError) -> OutputDirError:
    why = {errno.ENOTDIR: "a parent of it is a regular file", errno.EEXIST: "it exists and is not a folder",
           errno.EACCES: "permission denied (read-only?)", errno.EPERM: "permission denied (read-only?)",
           errno.EROFS: "read-only file system", errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
    err = OutputDirError(f"output_dir {out}: cannot write there: {why.get(e.errno, e.strerror or str(e))}"
                         + (f" ({e.filename})" if e.filename and os.path.abspath(e.filename) != os.path.abspath(out)
                            else ""))
    return err


def claim(out: str) -> bool:
    """Make ``out`` ours (create it, or adopt an empty or earlier pipeline folder); return whether some run of
    the pipeline created the folder. Raises OutputDirError (one line) otherwise."""
    marker = os.path.join(out, OWNER_FILE)
    try:
        if os.path.isfile(marker):
            lock(out)
            return bool(read_json(marker).get("created", False))
        if os.path.exists(out) and not os.path.isdir(out):
            raise OutputDirError(f"output_dir {out} is a file, not a folder")
        created = not os.path.exists(out)
        if not created:
            names = sorted(n for n in os.listdir(out) if n != LOCK_FILE)  # a lock alone: a claim cut short
            ours = os.path.isfile(fingerprint_file(work_dir(out)))  # written before the marker existed
            if names and not ours:
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise OutputDirError(f"output_dir {out} is not empty and was not written by the pipeline (it holds "
                                     f"{shown}): choose a new or empty folder")
        os.makedirs(out, exist_ok=True)
        lock(out)
        write_json(marker, {"created": created, "written_by": "data_pipeline"})
        return created
    except OSError as e:
        raise os_error(out, e) from None
    except ValueError:  # an unreadable marker: it is still ours
        return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _glob_reaches(pattern: str, target: str) -> bool:
    """Whether ``pattern`` (a glob) can match a file at or below the folder ``target`` (a real path): its literal
    leading folder is resolved, then each further part must match target's part, until a ``**`` or until the
    pattern goes on below target. A pattern that stops at target or above it names folders, which globs skip."""
    parts = os.path.abspath(pattern).split(os.sep)[1:]
    k = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    rel = os.path.relpath(target, os.path.realpath(os.sep + os.path.join(*parts[:k])) if k else os.sep)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return False
    below = [] if rel == os.curdir else rel.split(os.sep)
    for i, part in enumerate(parts[k:]):
        if part == "**" or i >= len(below):
            return True
        if not fnmatch.fnmatchcase(below[i], part):
            return False
    return False


def check_apart_from_inputs(out: str, paths, found=()) -> None:
    """Refuse (ConfigError, before anything is written) an ``output_dir`` that contains an input or lies inside
    an input folder (``input.paths``: files, folders or globs; ``found``: the files read from them, so that a
    link in an input folder to a file in output_dir counts too): the next run would read the pipeline's own
    outputs, a start-over delete inputs, a task overwrite the file it reads."""
    real_out = os.path.realpath(out)
    for p in paths:
        hits = [p]
        if glob.has_magic(p):
            if _glob_reaches(p, real_out):
                raise ConfigError(f"output_dir {out} lies inside what the input.paths glob {p} reads: a rerun "
                                  "would read the pipeline's own outputs; choose an output_dir outside the inputs")
            # what the reader takes from a glob (readers.expand_paths): a folder it matches (this run's own
            # output_dir, once written) is skipped, not read, so it is no overlap
            hits = [h for h in glob.glob(p, recursive=True) if os.path.isfile(h) or _is_hf_disk(h) or os.path.islink(h)]
        for hit in hits:
            real = os.path.realpath(hit)
            if _inside(real, real_out):
                raise ConfigError(f"input.paths entry {hit} lies inside output_dir {out}: the pipeline would read "
                                  "and delete its own input; move the input or choose another output_dir")
            if os.path.isdir(real) and _inside(real_out, real):
                raise ConfigError(f"output_dir {out} lies inside the input folder {hit} (input.paths): a rerun "
                                  "would read the pipeline's own outputs; choose an output_dir outside the inputs")
    for f in found:
        if _inside(os.path.realpath(f), real_out):
            raise ConfigError(f"input {f} is {os.path.realpath(f)}, inside output_dir {out}: the pipeline would read "
                              "and overwrite its own output; move the input or choose another output_dir")


def _holder(path: str) -> int | None:
    """pid holding the flock on ``path``, from /proc/locks (Linux); None when unknown."""
    try:
        inode = str(os.stat(path).st_ino)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == inode:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def lock(out: str) -> None:
    """Exclusive lock on the output folder for this process (reentrant); a second run is refused in one line
    naming the holder. A killed run leaves no stale lock: the kernel releases a flock with its process."""
    key = os.path.abspath(out)
    if key in _HELD:
        return
    path = os.path.join(out, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:  # a killed run's workers may still be exiting
                time.sleep(0.1)
                continue
        os.close(fd)
        pid = _holder(path)
        raise OutputDirError(f"output_dir {out} is in use by another pipeline run" + (f" (pid {pid})" if pid else "")
                             + ": wait for it to finish, or choose another output_dir") from None
    _HELD[key] = fd


def unlock(out: str) -> None:
    fd = _HELD.pop(os.path.abspath(out), None)
    if fd is not None:
        os.close(fd)


def _forget_locks_in_child() -> None:
    """A forked child (a pool worker) shares the parent's lock (one open file description): a worker outliving a
    killed main process kept the folder locked, the rerun refused "in use by pid <the dead one>". The child's copy
    is closed at fork; the parent keeps its lock (a flock goes only with the last descriptor)."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def remove_owned(out: str, names, created: bool, protect=()) -> None:
    """Remove the pipeline's own outputs (the files its manifest lists, none in ``protect``; a folder from before
    the manifest: ``names`` and ``work/``), then the marker and the folder if a run created it and nothing else is
    left in it; the user's files stay."""
    for name in () if remove_listed(out, protect) else tuple(names) + (WORK,):
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
    leftover = [n for n in os.listdir(out) if n not in (OWNER_FILE, LOCK_FILE)] if os.path.isdir(out) else []
    if not leftover:
        for name in (OWNER_FILE, LOCK_FILE):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        if created:
            os.rmdir(out)


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def file_digest(path: str, cache: dict) -> str:
    """xxh3-128 of a file's bytes (a folder: of its files' names and digests), through ``cache``."""
    if os.path.isdir(path):
        h = xxhash.xxh3_128()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(f"{os.path.relpath(full, path)}\0{file_digest(full, cache)}\n".encode())
        return h.hexdigest()
    st = os.stat(path)
    key, hit = _stat_key(st), cache.get(os.path.abspath(path))
    if hit and hit[0] == key:
        return hit[1]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    cache[os.path.abspath(path)] = [key, h.hexdigest()]
    return h.hexdigest()


def load_hash_cache(work: str) -> dict:
    try:
        cache = read_json(hash_cache_file(work))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def save_hash_cache(work: str, cache: dict) -> None:
    write_json(hash_cache_file(work), cache)


def input_digests(units, tokenizer_path: str, cache: dict) -> list:
    """[kind, id prefix, content digest] per input unit, plus the tokenizer file's digest when one is given."""
    out = []
    for unit in units:
        kind, path, rel = unit[0], unit[1], unit[2]
        out.append([kind, rel, file_digest(path, cache) if os.path.exists(path) else None])
    if tokenizer_path and os.path.isfile(tokenizer_path):
        out.append(["tokenizer.model_path", tokenizer_path, file_digest(tokenizer_path, cache)])
    return out
