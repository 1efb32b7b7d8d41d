"""What the pipeline wrote into its output folder, so that a start-over, a failed run or the end-of-run cleanup
removes exactly that and never a file the user put there (in ``shards/``, in ``work/`` or anywhere else).

Recording: every writer renames its file into place, and just before the rename it calls
``llmforge.common.atomic.note_write`` (atomic_path, ShardWriter, JsonlZstWriter, :func:`install_dir`). While a
run records (:func:`start_recording`, called when the run has claimed its folder and in every task, so forked, Ray
and Slurm workers record too), each process appends one JSON line per path, relative to ``output_dir``, to its own
log ``work/manifest/<host>-<pid>.jsonl``: one ``write(2)`` on an O_APPEND file, so a kill leaves at most a torn
last line (skipped), and a listed path that never appeared is harmless. Paths inside the temp folders that are
renamed into place whole (``shards.tmp<pid>/``) are not recorded; :func:`install_dir` records their final names.
A run that finished folds the logs into the sorted ``work/manifest.json`` (:func:`fold`): the same bytes whether
or not the run was killed and resumed on the way. A folder that a version from before the manifest wrote is listed
once by its layout (:func:`adopt_unlisted`), as that version would have removed it: no stale shard outlives a
start-over.

Removing (:func:`remove_listed`): only listed files; never an input of the run (or a file inside an input folder)
nor the tokenizer.model_path file; never through a folder that was replaced by a link out of ``output_dir``; a
listed path that is now a folder is not ours (we list files) and stays. Then the folders that held listed files,
deepest first, each only if it is empty (and, on a full removal, every empty folder under ``work/``: a task that
failed may have made one and written nothing): a folder with a user's file in it stays, and so does the file.
"""
from __future__ import annotations

import glob
import json
import os
import re
import socket

from llmforge.common import atomic

from .atomic_io import read_json, write_json
from .work_dirs import MANIFEST, MANIFEST_LOG as LOG_DIR, WORK, fingerprint_file, work_dir

_TEMP = re.compile(r"\.tmp\d+")  # a temp name (atomic.tmp_name, shard_task's folders): never a final path
_NEVER = (".llmforge-data", ".llmforge-data.lock")  # ownership marker and lock: output_dir.py handles them


class _Recorder:
    out: str | None = None  # absolute output folder being recorded
    fd: int | None = None  # this process's log, opened on first use
    pid: int | None = None  # the process that opened fd (a forked worker opens its own)


_REC = _Recorder()


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _record(path: str) -> None:
    if _REC.out is None:
        return
    rel = os.path.relpath(os.path.abspath(path), _REC.out)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or _TEMP.search(rel):
        return
    if _REC.pid != os.getpid():
        log = os.path.join(_REC.out, LOG_DIR, f"{socket.gethostname()}-{os.getpid()}.jsonl")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        _REC.fd, _REC.pid = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), os.getpid()
    os.write(_REC.fd, (json.dumps(rel) + "\n").encode("utf-8"))


def start_recording(out: str) -> None:
    """Record every file this process writes under ``out`` from now on (reopens the log: a start-over may have
    removed the previous one)."""
    stop_recording()
    _REC.out = os.path.abspath(out)
    if _record not in atomic.WRITE_HOOKS:
        atomic.WRITE_HOOKS.append(_record)


def stop_recording() -> None:
    if _REC.fd is not None and _REC.pid == os.getpid():
        os.close(_REC.fd)
    _REC.out = _REC.fd = _REC.pid = None


def _logs(out: str) -> list[str]:
    """The per-process logs (``<host>-<pid>.jsonl``; any other file there is not one of ours)."""
    found = glob.glob(os.path.join(glob.escape(out), LOG_DIR, "*-[0-9]*.jsonl"))
    return sorted(p for p in found if re.fullmatch(r".+-\d+\.jsonl", os.path.basename(p)))


def listed(out: str) -> set[str] | None:
    """Every path (relative to ``out``) the pipeline recorded there; None when the folder has no manifest at all
    (written by a version of the pipeline from before the manifest)."""
    paths, found = set(), False
    try:
        paths.update(p for p in read_json(os.path.join(out, MANIFEST)) if isinstance(p, str))
        found = True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError):
        found = True  # damaged by hand: delete less, never more
    for log in _logs(out):
        found = True
        with open(log, "rb") as f:
            lines = f.read().split(b"\n")[:-1]  # the last piece is empty, or a line torn by a kill
        for line in lines:
            try:
                path = json.loads(line)
            except ValueError:
                continue
            if isinstance(path, str):
                paths.add(path)
    return paths if found else None


def fold(out: str) -> None:
    """Merge the per-process logs into ``work/manifest.json`` (atomic, sorted) and drop them; only while no task
    runs (the end of a run that finished)."""
    paths = listed(out)
    if paths is None:
        return
    stop_recording()  # the manifest itself is not listed: remove_listed removes it by name
    try:
        write_json(os.path.join(out, MANIFEST), sorted(paths))
        for log in _logs(out):
            os.remove(log)
        os.rmdir(os.path.join(out, LOG_DIR))
    except OSError:  # disk full, a file the user put in work/manifest/: what is left says the same
        return


def adopt_unlisted(out: str, names) -> None:
    """A folder a pipeline from before the manifest wrote (``work/fingerprint.json`` but no manifest): list what
    its layout held (``names`` and ``work/``, as that version removed them), so that a start-over removes its old
    outputs and no stale shard is left beside new ones."""
    if listed(out) is not None or not os.path.isfile(fingerprint_file(work_dir(out))):
        return
    found = []
    for name in (*names, WORK):
        top = os.path.join(out, name)
        walk = [] if os.path.islink(top) else os.walk(top)
        found += [os.path.relpath(os.path.join(d, f), out) for d, _, files in walk for f in files]
        if os.path.isfile(top) or os.path.islink(top):
            found.append(name)
    write_json(os.path.join(out, MANIFEST), sorted(found))


def _kept(real: str, keep: set) -> bool:
    """Whether ``real`` or a folder above it is in ``keep``."""
    while True:
        if real in keep:
            return True
        up = os.path.dirname(real)
        if up == real:
            return False
        real = up


def remove_listed(out: str, protect=(), under=()) -> bool:
    """Remove the listed files (only those under the relative folders ``under`` when given, and then keep the
    manifest), never one in ``protect`` (files or folders: the run's inputs); then the emptied folders. Returns
    False, removing nothing, when ``out`` has no manifest."""
    paths = listed(out)
    if paths is None:
        return False
    root = os.path.realpath(out)
    keep = {os.path.realpath(p) for p in protect if p}  # a set: inputs may be 100k files
    folders = set()
    for rel in sorted(paths):
        rel = os.path.normpath(rel)
        if (os.path.isabs(rel) or rel.split(os.sep)[0] in (os.curdir, os.pardir, *_NEVER)
                or (under and not any(_inside(rel, u) for u in under))):
            continue
        p = os.path.join(out, rel)
        parent = os.path.realpath(os.path.dirname(p))
        real = os.path.join(parent, os.path.basename(p))
        if not _inside(parent, root) or _kept(real, keep):
            continue
        if os.path.islink(p) or os.path.isfile(p):
            os.remove(p)
        folders.update(os.path.dirname(rel)[:i] for i, ch in enumerate(os.path.dirname(rel) + os.sep)
                       if ch == os.sep)
    if not under:
        for log in _logs(out):
            os.remove(log)
        if os.path.isfile(os.path.join(out, MANIFEST)):
            os.remove(os.path.join(out, MANIFEST))
        work = work_dir(out)
        for d, _, _ in [] if os.path.islink(work) else os.walk(work):  # also folders a failed task left empty
            folders.add(os.path.relpath(d, out))
    for rel in sorted(folders, key=lambda r: r.count(os.sep), reverse=True):
        p = os.path.join(out, rel)
        if rel and os.path.isdir(p) and not os.path.islink(p) and not os.listdir(p):
            os.rmdir(p)
    return True


def install_dir(tmp: str, dest: str) -> None:
    """Put the folder ``tmp`` (built by this task, files only) at ``dest``: one rename when ``dest`` is absent, so
    it appears whole; otherwise file by file, replacing our earlier files of the same names and leaving any other
    file in ``dest`` alone (a start-over removed our older ones). Records the final names."""
    names = sorted(os.listdir(tmp))
    for name in names:
        atomic.note_write(os.path.join(dest, name))
    if not os.path.lexists(dest):
        os.replace(tmp, dest)
        return
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    os.rmdir(tmp)
