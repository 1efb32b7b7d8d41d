"""Process-group setup: torchrun, srun and plain ``python`` all end up with one initialised group.

A single process still gets a (HashStore) gloo group so the rest of the code — meshes, DCP, collectives —
has exactly one path.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    """A launch environment that cannot work (partial Slurm variables, bad world size...)."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def env_from_slurm(environ=os.environ) -> dict[str, str]:
    """Map SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK when started by ``srun`` without torchrun."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [k for k in keys if k not in environ]
    if missing:
        raise LaunchError(f"Slurm launch: {', '.join(missing)} not set (have SLURM_PROCID); start with srun")
    out = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
           "LOCAL_RANK": environ["SLURM_LOCALID"]}
    if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in environ:
        raise LaunchError("Slurm launch with several tasks: set MASTER_ADDR (first host of "
                          "`scontrol show hostnames $SLURM_JOB_NODELIST`) and MASTER_PORT, as launch/slurm/*.sbatch do")
    return out


def device_type(device: str = "auto") -> str:
    """"cuda" or "cpu": what ``pick_device`` will choose, without touching any device."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError("dist.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    os.environ.update(env_from_slurm())
    partial = [k for k in ("RANK", "WORLD_SIZE") if k in os.environ]
    if len(partial) == 1:
        raise LaunchError(f"only {partial[0]} is set; RANK and WORLD_SIZE must be set together (use torchrun)")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        # Flight Recorder: a hang dumps the last collectives of every rank (who stalled, in which op).
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                                    device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, world, local_rank, dev, backend)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or bool(re.search(r"gloo|nccl|timed out|closed by peer|connection reset",
                                                           str(e), re.I))


def collective_error(e: BaseException) -> str:
    """One line naming this rank, where in llmforge it was waiting, and the backend's reason."""
    pkg = f"{os.sep}llmforge{os.sep}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if pkg in f.filename]
    where = (f" in {frames[-1].name} ({frames[-1].filename[frames[-1].filename.rindex(pkg) + 1:]}:"
             f"{frames[-1].lineno})" if frames else "")
    reason = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    hint = ("; another rank stopped participating or crashed: check its log (dist.timeout_s bounds the wait)"
            if re.search(r"timed out|timeout|closed by peer|connection reset", reason, re.I) else "")
    return f"rank {dist.get_rank()} of {dist.get_world_size()}: collective failed{where}: {reason}{hint}"


def resolve_dtype(train_dtype: str, device: torch.device) -> torch.dtype:
    """``train.dtype`` → the compute dtype: bf16 when asked, or ``auto`` on CUDA; fp32 otherwise."""
    if train_dtype == "bf16" or (train_dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def exit_without_teardown(rc) -> None:
    """End a finished run without interpreter teardown. Process groups that outlive ``destroy_process_group``
    (DeviceMesh caches, DeepSpeed's comm module hold them) are freed there, and a gloo worker thread that then
    needs the GIL aborts the process (SIGABRT, "terminate called without an active exception") after a run that
    succeeded, failing the launcher. Everything llmforge writes is closed and flushed by then."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc if isinstance(rc, int) else (0 if rc is None else 1))
