"""Loading DCP checkpoint metadata without running code from the file.

A DCP checkpoint's ``.metadata`` is a pickle that ``FileSystemReader.read_metadata`` opens with plain
``pickle.load``: a crafted checkpoint runs arbitrary code the moment ``llmforge.eval`` (or a resume) touches it.
Here the same file goes through an allow-list unpickler that resolves only the classes a DCP metadata pickle
holds (torch.distributed.checkpoint.metadata, the file system reader's storage records, torch sizes, dtypes and
layouts, paths) and plain data builtins. Anything else (``os.system``, ``builtins.exec``, ``subprocess.*`` ...)
is refused before it is called, with :class:`UnsafePickleError` naming the file and the global.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

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


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader with ``read_metadata`` going through :func:`load_metadata` (no plain pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta
        metadata = load_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
