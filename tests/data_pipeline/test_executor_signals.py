"""The local executor's pool workers take SIGTERM's default action. With the CLI's Python-level handler inherited by
fork, a SIGTERM from Pool.terminate() that landed just before a worker blocked on the task queue's lock was never
handled, and the run hung at the end of a stage."""
from __future__ import annotations

import os
import signal
import types

from data_pipeline.executor import LocalExecutor, Stage, stage_results


def _probe(_ctx, _rank):
    return {"pid": os.getpid(), "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}


def test_pool_workers_die_on_sigterm_at_once(tmp_path):
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # what the CLI installs in the parent
    try:
        LocalExecutor(workers=2, progress=False).run(types.SimpleNamespace(work=str(tmp_path), out=str(tmp_path)),
                                                     [Stage("probe", 4, _probe)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    results = stage_results(str(tmp_path), "probe", 4)
    assert {r["pid"] for r in results} - {os.getpid()} == {r["pid"] for r in results}  # ran in the workers
    assert [r["sigterm_default"] for r in results] == [True] * 4
