"""The train layer (trainer, run plan, run guard, metrics, engines/, init_from) and its entry point:
``[torchrun | deepspeed --module | srun] python -m llmforge.train CONFIG.yaml [key=value ...]`` (``__main__``).

Produces ``run_dir/config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/step_N`` and ``loss.png``. The loop
is ``llmforge.train.trainer.Trainer``; the engine (``engine=native|deepspeed``) lives in ``llmforge.train.engines``.
"""
from __future__ import annotations

import os
import re
import sys

import torch.distributed as dist

from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.core.distributed import LaunchError, collective_error, is_collective_failure
from llmforge.train.engines.base import TrainingError

USAGE = "usage: python -m llmforge.train CONFIG.yaml [key=value ...]   (e.g. train.steps=20 parallel.tp=2)"
_LOCAL_RANK = re.compile(r"^--local[_-]rank(=(\d+))?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N`` (the deepspeed launcher and torch.distributed.launch add it;
    the same value is in the LOCAL_RANK environment variable, which is what llmforge reads)."""
    out, i = [], 0
    while i < len(argv):
        m = _LOCAL_RANK.match(argv[i])
        if m:
            if m.group(1) is None and i + 1 < len(argv) and argv[i + 1].isdigit():
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                i += 1
            elif m.group(2):
                os.environ.setdefault("LOCAL_RANK", m.group(2))
        else:
            out.append(argv[i])
        i += 1
    return out


def _say(line: str) -> None:
    """One write per line: ranks share stderr, and print's separate newline write (PYTHONUNBUFFERED) lets two
    ranks' lines run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _say_after_rank0(e: Exception, grace_s: float = 5.0) -> None:
    """A rank other than 0 that refused the config before any collective. Rank 0 usually refuses it too and prints
    the one line; if this rank got there first, torchrun would SIGTERM rank 0 before it could. So wait (SIGTERM
    now ends this rank silently: rank 0 said it), then print the line, for a refusal rank 0 did not share."""
    import signal
    import time
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(grace_s)
    _say(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    try:
        cfg = load_config(RunConfig, argv[0], argv[1:])
        from llmforge.train.trainer import run_training
        return run_training(cfg)
    except (ConfigError, LaunchError, TrainingError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LLMFORGE_DEBUG"):
            raise
        if rank0 or not (isinstance(e, ConfigError) or getattr(e, "every_rank", False)):
            _say(f"error: {e}")
        elif os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun stops the others when one rank exits: let rank 0
            _say_after_rank0(e)                      # (which sees the same config) say it, else say it here
        return getattr(e, "exit_status", 2)  # 1 for runtime refusals that say so (llmforge.checkpoint.checkpointer)
    except RuntimeError as e:  # a failed/timed-out collective: gloo and NCCL do not say which rank saw it
        if os.environ.get("LLMFORGE_DEBUG") or not dist.is_initialized() or not is_collective_failure(e):
            raise
        _say(f"error: {collective_error(e)}")
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
