"""Atomic writes: a temp name in the same folder, then ``os.replace`` — readers see the old file or the new one,
never half of one, and a crash leaves at most a ``*.tmpPID`` file that the next writer overwrites."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np


WRITE_HOOKS: list = []  # each called with a final path just before it is renamed into place (the pipeline's manifest)


def note_write(path: str) -> None:
    """Tell the hooks that ``path`` is about to appear (writers that rename by themselves call this too)."""
    for hook in WRITE_HOOKS:
        hook(path)


def tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temp path; rename it to ``path`` only if the block succeeds (the temp file is removed otherwise)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        note_write(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def copy_file(src: str, dst: str) -> None:
    import shutil
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_figure(fig, path: str, **savefig_kwargs) -> str:
    """Lay out, write atomically as PNG (a reader never sees half a plot), close; every plot of a run goes here."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    plt.close(fig)
    return path
