"""torchrun's elastic agent, run in this process by ``launch.torchrun``, with the exit status a scheduler needs.

Plain ``torchrun`` (torch 2.13, ``torch/distributed/elastic``) on SIGTERM: its signal handler raises
``SignalException`` inside the agent's monitor loop; ``SimpleElasticAgent.run`` forwards the signal to the
workers, waits up to ``--shutdown-timeout`` seconds (default 30) for them, SIGKILLs the rest, and re-raises. The
exception leaves ``torch.distributed.run.main`` uncaught: a traceback and exit status 1, whatever the workers did,
even when every one of them saved a checkpoint and exited 75. Nothing a worker does can change that (the
exception is raised in the agent's own process by its own handler), so llmforge's launcher catches it here,
reads the workers' exit statuses and exits 75 when all of them exited 75 (saved: requeue), 0 when they had all
finished, else 128 + the signal, each time with one line instead of the traceback. Workers that all exit 75 on their own (a signal sent to them,
not to torchrun) make torchrun raise ``ChildFailedError``: the same 75 and one line.
"""
from __future__ import annotations

import logging
import signal
import sys
import time

from llmforge.train.run_guard import PREEMPTED_EXIT  # 75: a worker stopped on a signal after saving a checkpoint

# torchrun's routine shutdown messages, replaced by the one line below (its SIGKILL warning is kept)
_ROUTINE = ("Received %s death signal, shutting down workers", "Sending process %s closing signal %s")


CONFIG_EXIT = 2  # a worker refused the config and printed the one line that says why (llmforge.train)
_FAILED = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"


class _DropRoutine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        refused = record.msg == _FAILED and bool(record.args) and record.args[0] == CONFIG_EXIT
        return record.msg not in _ROUTINE and not refused


def _capture_worker_contexts() -> list:
    """The process contexts the agent starts its workers in (one per restart), to read their exit statuses after a
    signal; torch keeps them on the agent object, which launch_agent does not hand out."""
    import torch.distributed.elastic.agent.server.local_elastic_agent as lea
    contexts: list = []
    start = getattr(lea, "start_processes", None)
    if start is None:  # another torch layout: statuses stay unknown, so a stop is never reported as saved
        return contexts

    def recording_start(*args, **kwargs):
        ctx = start(*args, **kwargs)
        contexts.append(ctx)
        return ctx
    lea.start_processes = recording_start
    return contexts


def _exit_statuses(contexts: list, wait_s: float) -> dict[int, int | None]:
    """{local rank: exit status} of the newest worker group (None: unknown). Workers still running (a second
    signal interrupted torchrun's own wait) get up to ``wait_s`` more seconds to finish saving."""
    handlers = getattr(contexts[-1], "subprocess_handlers", None) if contexts else None
    if not handlers:
        return {}
    deadline = time.monotonic() + wait_s
    for h in handlers.values():
        while h.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    return {rank: h.proc.poll() for rank, h in sorted(handlers.items())}


def _all_saved(statuses: dict) -> bool:
    return bool(statuses) and all(c == PREEMPTED_EXIT for c in statuses.values())


def _saved(why: str) -> int:
    print(f"launch.torchrun: {why}: every worker saved a checkpoint and exited {PREEMPTED_EXIT}; rerun the same "
          f"command to resume (exit status {PREEMPTED_EXIT})", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT


def _stopped(sig: signal.Signals, statuses: dict) -> int:
    if _all_saved(statuses):
        return _saved(f"stopped by {sig.name}")
    if statuses and all(c == 0 for c in statuses.values()):  # the signal came after the run had finished
        print(f"launch.torchrun: {sig.name} after every worker had finished (exit status 0)", file=sys.stderr,
              flush=True)
        return 0
    text = ", ".join(f"{r}: {'still running' if c is None else c}" for r, c in statuses.items()) or "none started"
    print(f"launch.torchrun: stopped by {sig.name}, not every worker saved; worker exit statuses by local rank: "
          f"{text} (exit status {128 + int(sig)})", file=sys.stderr, flush=True)
    return 128 + int(sig)


def run_agent(torchrun_args: list[str], shutdown_timeout: float) -> int:
    """``torch.distributed.run.main(torchrun_args)`` in this process; its exit status (see the module doc)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    contexts = _capture_worker_contexts()
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_DropRoutine())
    try:
        torchrun.main(torchrun_args)
        return 0
    except SignalException as e:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # a repeated signal must not cut the saves short
            signal.signal(sig, signal.SIG_IGN)
        return _stopped(signal.Signals(e.sigval), _exit_statuses(contexts, shutdown_timeout))
    except ChildFailedError as e:
        if _all_saved({f.local_rank: f.exitcode for f in e.failures.values()}):
            return _saved("the workers were stopped by a signal")
        if e.get_first_failure()[1].exitcode == CONFIG_EXIT:  # that rank's one line is the report (no traceback)
            return CONFIG_EXIT
        raise  # torchrun's own failure report (root cause, per-rank error files), as plain torchrun prints it
