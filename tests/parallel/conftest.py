"""Multi-process numerics on CPU/gloo: fork N ranks that each run the real trainer entry point
(``llmforge.train.main`` with the torchrun environment variables), then compare metrics.jsonl and checkpoints.

Forking keeps each run to a few seconds on 2 cores (a fresh interpreter per rank costs several seconds of
``import torch``). Ranks fork from a forkserver, never from the pytest process: by the time these tests run,
earlier in-process tests have left threads in pytest (gloo loops of a leaked group, jemalloc, tqdm's monitor,
tokenizer pools), and a rank forked while one of them held a lock hung mid-training. The server is a fresh
interpreter that imports this module (torch, llmforge, one intra-op thread) and does nothing else.
A few tests also go through ``python -m torch.distributed.run`` itself.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
import time

import pytest
import torch

torch.set_num_threads(1)
# Imported once here so forked ranks start with everything loaded (importing in each child costs seconds).
import llmforge.parallel.apply  # noqa: E402,F401
import llmforge.parallel.pipeline  # noqa: E402,F401
import llmforge.train  # noqa: E402,F401
import torch.distributed.checkpoint.format_utils  # noqa: E402,F401
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
# 6 fp32 steps of the tiny Llama on 64-token windows; eval and mid-run checkpoints off unless a test asks.
BASE = ["model.vocab_size=64", "data.seq_len=64", "train.steps=6", "train.global_batch_size=8", "train.lr=3e-3",
        "train.warmup_steps=2", "train.eval_interval=0", "train.eval_batches=2", "checkpoint.interval=0",
        "logging.plot=false", "seed=11"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """The forkserver context; rank targets and patches must be picklable (module-level functions, partials)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _as_parent(env: dict, cwd: str) -> None:
    """A forkserver child starts with the server's environment and cwd: take the test's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _child(rank: int, world: int, port: int, argv: list[str], log: str, patch, env: dict, cwd: str) -> None:
    _as_parent(env, cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest's capture replaces sys.stdout/err with objects that bypass fd 1/2: point them at the log
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    rc = 1
    try:
        if world > 1:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ["WANDB_MODE"] = "disabled"
        if patch is not None:
            patch(rank)
        from llmforge.train import main
        rc = main(list(argv))
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def launch(nproc: int, overrides: list[str], run_dir: str, timeout: float = 240, patch=None,
           grace_after_first_exit: float | None = None) -> tuple[list[int], list[float]]:
    """Run the trainer (tiny-cpu + BASE) on ``nproc`` forked ranks; see ``launch_argv``."""
    return launch_argv(nproc, [CONFIG, *BASE, f"run_dir={run_dir}", *overrides], run_dir, timeout, patch,
                       grace_after_first_exit)


def launch_argv(nproc: int, argv: list[str], run_dir: str, timeout: float = 240, patch=None,
                grace_after_first_exit: float | None = None) -> tuple[list[int], list[float]]:
    """Run ``llmforge.train argv`` on ``nproc`` forked ranks; return (exit codes, exit times) (logs:
    <run_dir>.rank*.log). Ranks still alive at ``timeout`` (or ``grace_after_first_exit`` s after the first rank
    ends) are killed."""
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    ctx = _context()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, nproc, port, argv, f"{run_dir}.rank{r}.log", patch,
                                              dict(os.environ), os.getcwd()))
             for r in range(nproc)]
    for p in procs:
        p.start()
    deadline, ended = time.time() + timeout, [None] * nproc
    while None in ended and time.time() < deadline:
        mp.connection.wait([p.sentinel for p, e in zip(procs, ended) if e is None], timeout=0.2)
        for i, p in enumerate(procs):
            if ended[i] is None and not p.is_alive():
                ended[i] = time.time()
                if grace_after_first_exit is not None:
                    deadline = min(deadline, ended[i] + grace_after_first_exit)
    for i, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        p.join()
        ended[i] = ended[i] or time.time()
    return [p.exitcode for p in procs], ended


def _fn_child(rank, world, port, fn, args, out, env, cwd):
    _as_parent(env, cwd)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import pickle
    import torch.distributed as dist
    rc = 1
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(result, f)
        dist.destroy_process_group()
        rc = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run_fn(nproc: int, fn, *args, tmp: str, timeout: float = 120) -> list:
    """Call ``fn(rank, world, *args)`` on ``nproc`` forked ranks of an initialised gloo group; return the results."""
    import pickle
    ctx = _context()
    port, out = free_port(), os.path.join(tmp, f"result{time.time_ns()}")
    procs = [ctx.Process(target=_fn_child, args=(r, nproc, port, fn, args, out, dict(os.environ), os.getcwd()))
             for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * nproc, [p.exitcode for p in procs]
    results = []
    for r in range(nproc):
        with open(f"{out}.{r}", "rb") as f:
            results.append(pickle.load(f))
    return results


def logs(run_dir: str) -> str:
    out = []
    d, name = os.path.dirname(run_dir), os.path.basename(run_dir)
    for f in sorted(os.listdir(d)):
        if f.startswith(name + ".rank") and f.endswith(".log"):
            out.append(f"--- {f}\n" + open(os.path.join(d, f)).read()[-3000:])
    return "\n".join(out)


def losses(run_dir: str) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_loss(run_dir: str) -> float:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def final_params(run_dir: str) -> dict[str, torch.Tensor]:
    """Model tensors of the newest checkpoint, read back from DCP in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = os.path.join(run_dir, "checkpoints")
    newest = sorted(d for d in os.listdir(ckpt) if d.startswith("step_"))[-1]
    out = os.path.join(run_dir, "final.pt")
    if not os.path.exists(out):
        dcp_to_torch_save(os.path.join(ckpt, newest), out)
    return torch.load(out, weights_only=False)["model"]


def param_max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class Runner:
    """Runs layouts under one tmp dir; the single-process reference for a given set of overrides is cached."""

    def __init__(self, root: str, data: str):
        self.root, self.data, self._refs = root, data, {}

    def run(self, name: str, nproc: int, overrides: list[str], timeout: float = 240, patch=None,
            expect_ok: bool = True, grace: float | None = None) -> str:
        run_dir = os.path.join(self.root, name)
        t = time.time()
        rcs, self.ended = launch(nproc, [f"data.paths=[{self.data}]", *overrides], run_dir, timeout, patch, grace)
        self.last_exit_codes = rcs
        print(f"[{name}] {nproc} ranks, {time.time() - t:.1f}s, exit codes {rcs}")
        if expect_ok:
            assert rcs == [0] * nproc, f"{name}: exit codes {rcs}\n{logs(run_dir)}"
        return run_dir

    def reference(self, overrides: list[str] = ()) -> str:
        key = tuple(overrides)
        if key not in self._refs:
            self._refs[key] = self.run(f"ref{len(self._refs)}", 1, list(overrides))
        return self._refs[key]


@pytest.fixture(scope="session")
def runner(tmp_path_factory, synth_data) -> Runner:
    return Runner(str(tmp_path_factory.mktemp("parallel")), synth_data)
