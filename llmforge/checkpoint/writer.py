"""How a checkpoint's DCP files are written: fast, durable, and (``checkpoint.async_save``) off the training thread.

Sync: ``dcp.save`` through DCP's own FileSystemWriter (one file per rank, fsync'd before the COMPLETE marker is
written, so a power loss never leaves a marker vouching for data still in the page cache). For the duration of the
write torch.save's per-record zip CRC32 is off: zlib's CRC32 of every byte costs about as long as copying the bytes
to the page cache (0.05 s per 100 MB here, half of a plain torch.save), and the marker's xxh3-64 of every file,
checked on every load before torch reads a byte, vouches for the same bytes at a quarter of that cost. That digest
is taken from the bytes on their way to the file, not by reading 100 MB back. The files stay ordinary DCP files
(torch.load ignores an absent CRC) that load into any layout.

Async: training is blocked only while the state dict's references are taken. A background thread copies the state
into staging buffers that DCP's DefaultStager keeps between saves (pinned memory on CUDA, so there is no allocation
after the first save), then writes, hashes and commits the checkpoint (marker, rename, rotation) on a gloo process
group of its own: collectives issued by two threads on one group could pair up differently on different ranks.
Until the copy is done every optimizer's ``step`` waits (a step pre-hook): the next forward and backward overlap
the copy, the update that would change the tensors being copied does not. The next save, and the end of training,
wait for the write and raise its error.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.utils import serialization

from llmforge.checkpoint.integrity import HASH


class _HashingStream(io.IOBase):
    """A file being written, hashed on the way: the digest of a file written front to back equals the digest of
    reading it back, without reading 100 MB back from the page cache."""

    def __init__(self, f):
        self._f, self.hash, self.length = f, getattr(xxhash, HASH)(), 0

    def write(self, b) -> int:
        self.hash.update(b)
        self.length += memoryview(b).nbytes
        return self._f.write(b)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class _HashingFileSystem(FileSystem):
    """DCP's FileSystem, recording the marker's digest (llmforge.checkpoint.integrity.HASH) of every file it writes
    by file name; a file not written front to back (its length differs from what was hashed) is left out and hashed
    by reading it back."""

    def __init__(self):
        self.digests: dict[str, str] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as f:
            if "w" not in mode or "+" in mode:
                yield f
                return
            stream = _HashingStream(f)
            yield stream
            if stream.length == os.path.getsize(path):
                self.digests[os.path.basename(path)] = stream.hash.hexdigest()

    def rename(self, path, new_path) -> None:  # DCP writes .metadata.tmp, then renames it
        super().rename(path, new_path)
        if (digest := self.digests.pop(os.path.basename(path), None)) is not None:
            self.digests[os.path.basename(new_path)] = digest


def write_dcp(state: dict, path: str, group=None) -> dict[str, str]:
    """``dcp.save`` of ``state`` into the folder ``path``, fsync'd, without the zip CRC32 (see the module docstring);
    ``group``: the process group for DCP's planning collectives (None: the default group). Returns the digest of
    each file this rank wrote, by file name."""
    # one write thread: on 2 cores a second one only competes with the first for the GIL and the page cache
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.fs = _HashingFileSystem()
    with serialization.config.patch({"save.compute_crc32": False}), _no_gc():
        dcp.save(state, storage_writer=writer, process_group=group)
    return dict(writer.fs.digests)


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector off for the write: DCP's plans (thousands of small objects per save) survive the
    collections they trigger and so trigger a full one, 0.12 s over the ~300k objects of a training process here,
    in about one save in three. They are freed by reference counting before the collector is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class AsyncWriter:
    """One background write at a time. Constructing it is collective (it creates the checkpoint's gloo group)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        # blocking copies: on CUDA they run on the writer's own stream, so they wait for that stream only
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=False))
        self._stream = torch.cuda.Stream() if cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmforge-checkpoint")
        self._future: Future | None = None
        self._hooks: list = []

    def submit(self, state: dict, optimizers, write) -> None:
        """Stage ``state`` and run ``write(staged_state, group)`` in the background; the optimizers' next ``step``
        waits until the staging copy is done."""
        staged = threading.Event()
        self._hooks = [opt.register_step_pre_hook(lambda *_: (staged.wait(), None)[1]) for opt in optimizers]
        ready = None
        if self._stream is not None:  # the copy must follow the update queued before this save
            ready = torch.cuda.Event()
            ready.record()

        def run():
            try:
                snapshot = self._stage(state, ready)
            finally:
                staged.set()  # an error is raised by result(); training must not wait forever for it
            write(snapshot, self.group)

        self._future = self._pool.submit(run)

    def _stage(self, state: dict, ready):
        if self._stream is None:
            return self._stager.stage(state)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            return self._stager.stage(state)

    def busy(self) -> bool:
        """Whether a background write is still running (bench/checkpoint.py counts the steps it overlaps)."""
        return self._future is not None and not self._future.done()

    def result(self) -> None:
        """Wait for the background write; raise what it raised."""
        future, self._future = self._future, None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if future is not None:
            future.result()
