"""Unpickling files without running code from them: every pickle llmforge reads goes through this module.

A DCP checkpoint's ``.metadata`` is a pickle that ``FileSystemReader.read_metadata`` opens with plain
``pickle.load``: a crafted checkpoint runs arbitrary code the moment ``llmforge.eval`` (or a resume) touches it.
Here the same file goes through an allow-list unpickler that resolves only the classes a DCP metadata pickle
holds (torch.distributed.checkpoint.metadata, the file system reader's storage records, torch sizes, dtypes and
layouts, paths) and plain data builtins. Anything else (``os.system``, ``builtins.exec``, ``subprocess.*`` ...)
is refused before it is called, with :class:`UnsafePickleError` naming the file and the global.

Every other pickle (``torch.save`` files: RNG states, ``pytorch_model.bin``, DeepSpeed's model/optimizer states,
the non-tensor entries of a DCP checkpoint) is read by :func:`safe_torch_load`, ``torch.load(weights_only=True)``
with torch's long advice to set ``weights_only=False`` turned into one line naming the file. Libraries that call
``torch.load(weights_only=False)`` themselves (DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32``, DCP's
``load_bytes``) run inside :func:`weights_only_loads`, which routes their calls through the same loader and
allows only the named plain-data classes they pickle.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader

# Data-only builtins: constructing them runs no user-chosen code (exec, eval, open, getattr, __import__ are absent).
_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "range", "complex", "bytearray", "bytes",
                  "int", "float", "str", "bool"}
_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {"BytesStorageMetadata", "ChunkStorageMetadata", "Metadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps "torch.strided" -> torch.strided (a lookup in torch's own table)
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "torch": {"Size"},
}


class UnsafePickleError(ValueError):
    """A pickle that references something outside the allow-list: printed as one line naming the file."""
    exit_status = 1  # the file is at fault, not the command line: the CLIs exit 1 (llmforge.train, run_cli)


class UnreadablePickleError(ValueError):
    """A ``torch.save`` file or entry that is garbled or truncated (not crafted): one line naming it."""


def _allowed(module: str, name: str) -> bool:
    if module == "builtins":
        return name in _SAFE_BUILTINS
    if name in _DCP_MODULES.get(module, ()):
        return True
    if module == "torch":  # dtypes (torch.float32 ...), layouts and memory formats are plain enum-like values
        import torch
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return False


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafePickleError(f"refusing to load {self.source}: it references {module}.{name}, which DCP "
                                    "checkpoint metadata never holds (a crafted or foreign file; not loaded)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to load {self.source}: unexpected persistent id in a metadata pickle")


def load_metadata(path: str):
    """Unpickle a DCP ``.metadata`` file through the allow-list; UnsafePickleError / ValueError name the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return AllowListUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/garbled pickles raise many types
        raise ValueError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None


def _weights_only_reason(e: Exception) -> str:
    """What torch's weights-only refusal refused, without its advice to load with weights_only=False."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return m.group(1).split(" Please ")[0].strip() if m else (text.strip().splitlines() or [type(e).__name__])[0]


def safe_torch_load(f, source: str | None = None, **kwargs: Any):
    """``torch.load(f, weights_only=True)`` (tensors and plain data only; map_location defaults to cpu). A file
    that needs anything else raises :class:`UnsafePickleError`, one that cannot be read UnreadablePickleError: one line
    naming ``source`` (default: the path)."""
    name = source or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else "a pickled entry")
    kwargs["weights_only"] = True
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.serialization.load(f, **kwargs)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a class or function outside the weights-only allow-list: a crafted or foreign file
            raise UnsafePickleError(f"refusing to load {name}: {_weights_only_reason(e)} (only tensors and plain "
                                    "data are unpickled, never code; not loaded)") from None
        why = _weights_only_reason(e) or type(e).__name__
        raise UnreadablePickleError(f"{name}: unreadable (garbled or truncated: {why})") from None
    except (RuntimeError, EOFError, ValueError, AttributeError, KeyError) as e:  # OSError (missing file) stays
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadablePickleError(f"{name}: unreadable ({type(e).__name__}: {first})") from None


@contextlib.contextmanager
def weights_only_loads(allowed: tuple = (), source: str | None = None):
    """While inside, every ``torch.load`` (also a library's own ``weights_only=False`` call) is
    :func:`safe_torch_load`, with the plain-data classes in ``allowed`` (e.g. DeepSpeed's ZeroStageEnum) added to
    what may be unpickled. ``source`` names what is read when the call passes a file object, not a path."""
    original = torch.load

    def load(f, *args: Any, **kwargs: Any):
        kwargs.pop("weights_only", None)
        if args:  # torch.load(f, map_location, pickle_module, ...): only map_location is ever passed by position
            kwargs.setdefault("map_location", args[0])
        kwargs.pop("pickle_module", None)
        return safe_torch_load(f, None if isinstance(f, (str, os.PathLike)) else source, **kwargs)
    torch.load = load
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        torch.load = original


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader with ``read_metadata`` going through :func:`load_metadata` (no plain pickle) and
    ``read_data`` through :func:`weights_only_loads`: DCP's ``load_bytes`` unpickles the non-tensor entries
    (optimizer hyper-parameters ...) of a checkpoint with ``weights_only=False``."""

    def read_data(self, plan, planner):
        with weights_only_loads(source=f"an entry of checkpoint {os.fspath(self.path)}"):
            return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta
        metadata = load_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
