"""Executors: run a pipeline's stages as tasks (rank r of n), locally on ``workers`` processes or as Slurm job
arrays chained with ``afterok`` dependencies.

A task is done only when its marker ``work/markers/<stage>/<rank>.json`` exists (written last, atomically, and
holding the task's stats); reruns skip done tasks, so a run killed at any moment resumes to byte-identical
outputs. Outputs are deterministic functions of (input, config, task count): never of worker count or timing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import glob
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from tqdm import tqdm

from llmforge.common.slurm import TASK_SCRIPT, array_sbatch_args, submit, wait_for_jobs

from .atomic_io import note_write, read_json, write_bytes, write_json
from .work_dirs import marker_path, slurm_log, slurm_log_dir, slurm_script, timing_path


class PipelineError(Exception):
    """A failure with a one-line message (file/line/stage named); the CLI prints it without a traceback."""

    keep_work = False  # True: leave work/ in place (logs to read, tasks to resume)


class SlurmJobError(PipelineError):
    keep_work = True


class DiskFullError(PipelineError):
    """No space left: finished tasks and stages stay (their markers), so a rerun resumes once space is freed."""

    keep_work = True


def task_error(stage: str, rank: int, e: Exception) -> PipelineError:
    """One-line error for a failed task: input errors already name file and line; others get stage and rank."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"stage {stage} task {rank}: disk full{f' writing {e.filename}' if e.filename else ''}; "
                             "finished stages are kept: free space and rerun the same command to resume")
    if isinstance(e, PipelineError) or type(e).__name__ == "InputError":
        return PipelineError(str(e))
    return PipelineError(f"stage {stage} task {rank}: {type(e).__name__}: {e}")


@dataclasses.dataclass
class Stage:
    name: str
    n_tasks: int
    fn: Callable  # fn(ctx, rank) -> JSON-able stats dict
    warmup: Callable | None = None  # warmup(ctx): load shared models once in the parent, before forking


def is_done(work: str, stage: str, rank: int) -> bool:
    return os.path.exists(marker_path(work, stage, rank))


def stage_results(work: str, stage: str, n: int) -> list[dict]:
    return [read_json(marker_path(work, stage, r)) for r in range(n)]


def run_task(ctx, stage: Stage, rank: int) -> float:
    """Run one task unless its marker exists; return its seconds (0 when skipped)."""
    if is_done(ctx.work, stage.name, rank):
        return 0.0
    from .manifest import start_recording
    start_recording(ctx.out)  # every process (fork, Ray, Slurm) lists what it writes: cleanups remove only that
    t0 = time.perf_counter()
    stats = stage.fn(ctx, rank)
    seconds = time.perf_counter() - t0
    # Timings live apart from markers so that markers (and stats.json) stay byte-reproducible.
    write_json(timing_path(ctx.work, stage.name, rank), {"seconds": round(seconds, 3)})
    write_json(marker_path(ctx.work, stage.name, rank), stats)
    return seconds


TEMP_NAME = re.compile(r"\.tmp\d+(\.[A-Za-z][A-Za-z.]*)?$")  # atomic.tmp_name, ShardWriter's NAME.tmpPID.bin


def remove_temp_files(out: str, work: str) -> None:
    """Delete leftovers of killed writers (``*.tmp<pid>[.ext]``, nothing else: a user's ``notes.tmpl`` stays):
    anywhere under work/, and only at the top of the output folder (which may be shared with other files).
    Called before any task of this run starts."""
    found = glob.glob(os.path.join(work, "**", "*.tmp[0-9]*"), recursive=True)
    found += glob.glob(os.path.join(out, "*.tmp[0-9]*"))
    for path in (p for p in found if TEMP_NAME.search(os.path.basename(p))):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


_POOL_CTX = None  # the context seen by forked workers


def die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG): a ``kill -9`` of the run's
    main process must not leave workers writing into work/ behind it. A parent already gone (it died between
    the fork and this call) ends it now."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(conn, stage: Stage, parent_pid: int) -> None:
    """One forked worker: run the ranks the parent sends over ``conn`` until it sends None; answer each with
    (rank, error or None). SIGTERM keeps its default action (the CLI's handler, inherited by fork, would only run
    between bytecodes)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills the workers
    die_with_parent(parent_pid)
    while (rank := conn.recv()) is not None:
        try:
            run_task(_POOL_CTX, stage, rank)
            conn.send((rank, None))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent with the task named
            conn.send((rank, task_error(stage.name, rank, e)))


class _Workers:
    """``n`` forked workers, each fed one rank at a time over its own pipe. Nothing is shared between processes
    but the pipes, so a worker killed at any moment cannot leave a lock held: multiprocessing.Pool's terminate
    could hang forever on its result queue's lock when a worker died holding it."""

    def __init__(self, n: int, stage: Stage):
        ctx = multiprocessing.get_context("fork")
        self.procs, self.conns = [], []
        for _ in range(n):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child_end, stage, os.getpid()), daemon=True)
            p.start()
            child_end.close()
            self.procs.append(p)
            self.conns.append(parent_end)

    def run(self, stage: Stage, ranks: list[int], on_done: Callable[[], None]) -> None:
        todo, busy = list(ranks), {}
        for conn, proc in list(zip(self.conns, self.procs))[:len(todo)]:
            conn.send(todo.pop(0))
            busy[conn] = proc
        while busy:
            by_sentinel = {p.sentinel: c for c, p in busy.items()}
            for ready in multiprocessing.connection.wait(list(busy) + list(by_sentinel)):
                conn = by_sentinel.get(ready, ready)
                if conn not in busy:
                    continue  # its worker's pipe and sentinel were both ready: handled once
                try:
                    rank, err = conn.recv()
                except EOFError:  # the worker died without answering (killed, out of memory)
                    raise PipelineError(f"stage {stage.name}: a worker process died (exit code "
                                        f"{busy[conn].exitcode}) while running a task") from None
                if err is not None:
                    raise err
                on_done()
                if todo:
                    conn.send(todo.pop(0))
                else:
                    conn.send(None)  # it exits
                    del busy[conn]

    def close(self, kill: bool) -> None:
        """Wait for every worker (killed first if ``kill``: after a failed task), so that nothing writes into
        work/ once this returns."""
        for p in self.procs:
            if kill and p.exitcode is None:
                p.kill()
            p.join()
        for conn in self.conns:
            conn.close()


class LocalExecutor:
    """Stages in order; the pending tasks of a stage on a fork pool of ``workers`` processes."""

    def __init__(self, workers: int, progress: bool = True):
        self.workers, self.progress = workers, progress

    def run(self, ctx, stages: list[Stage]) -> dict[str, float]:
        walls = {}
        for stage in stages:
            pending = [r for r in range(stage.n_tasks) if not is_done(ctx.work, stage.name, r)]
            t0 = time.perf_counter()
            if pending and stage.warmup:
                stage.warmup(ctx)
            with tqdm(total=stage.n_tasks, initial=stage.n_tasks - len(pending), desc=f"{stage.name:>10}",
                      unit="task", disable=not self.progress, file=sys.stderr, leave=True) as bar:
                self._run_pending(ctx, stage, pending, bar)
            walls[stage.name] = time.perf_counter() - t0
        return walls

    def _run_pending(self, ctx, stage: Stage, pending: list[int], bar) -> None:
        global _POOL_CTX
        n_proc = min(self.workers, len(pending))
        if n_proc <= 1:
            for r in pending:
                try:
                    run_task(ctx, stage, r)
                except Exception as e:
                    raise task_error(stage.name, r, e) from e
                bar.update(1)
            return
        _POOL_CTX = ctx  # forked workers inherit it; nothing is pickled but ranks and results
        workers, failed = _Workers(n_proc, stage), True
        try:
            workers.run(stage, pending, lambda: bar.update(1))
            failed = False
        finally:
            workers.close(kill=failed)


class SlurmExecutor:
    """Each stage becomes ``sbatch --array=<pending ranks>`` depending (afterok) on the previous stage's job.
    sbatch gets an argument list; the job script only execs its arguments."""

    def __init__(self, cfg, config_path: str):
        self.cfg, self.config_path = cfg, os.path.abspath(config_path)

    def sbatch_args(self, ctx, stage: Stage, ranks: list[int], depend: str | None) -> list[str]:
        args = array_sbatch_args(f"data-{stage.name}", ranks, slurm_log(ctx.work, stage.name, "%a"), self.cfg.slurm,
                                 depend)
        script = slurm_script(ctx.work)
        return args + [script, self.cfg.slurm.python or sys.executable, "-m", "data_pipeline", "task",
                       self.config_path, "--stage", stage.name]

    def run(self, ctx, stages: list[Stage]) -> dict[str, float]:
        os.makedirs(slurm_log_dir(ctx.work), exist_ok=True)
        script = slurm_script(ctx.work)
        write_bytes(script, TASK_SCRIPT.encode())
        os.chmod(script, 0o755)
        jobs, depend, t0 = [], None, time.perf_counter()
        for stage in stages:
            pending = [r for r in range(stage.n_tasks) if not is_done(ctx.work, stage.name, r)]
            if not pending:
                continue
            for r in pending:  # Slurm writes these logs: listed here, so a start-over removes them (manifest.py)
                note_write(slurm_log(ctx.work, stage.name, r))
            depend = submit(self.sbatch_args(ctx, stage, pending, depend), PipelineError,
                            f"sbatch for stage {stage.name}")
            jobs.append((stage, depend))
            print(f"submitted {stage.name}: job {depend} ({len(pending)} tasks)", file=sys.stderr)
        if not self.cfg.slurm.wait or not jobs:
            return {}
        if wait_for_jobs([j for _, j in jobs], self.cfg.slurm.poll_s):
            subprocess.run(["scancel", *[j for _, j in jobs]], capture_output=True)
        for stage in stages:
            missing = [r for r in range(stage.n_tasks) if not is_done(ctx.work, stage.name, r)]
            if missing:
                logs = slurm_log(ctx.work, stage.name, missing[0])
                tail = open(logs, errors="replace").read().strip().splitlines()[-1:] if os.path.exists(logs) else []
                raise SlurmJobError(f"slurm stage {stage.name} tasks {missing} did not finish; see {logs}"
                                    + (f": {tail[0]}" if tail else ""))
        return {"slurm_total": time.perf_counter() - t0}
