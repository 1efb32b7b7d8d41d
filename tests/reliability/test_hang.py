"""One rank stops participating (it sleeps forever before a collective): with a small ``dist.timeout_s`` the other
ranks must fail within about that timeout, with an error naming the rank / collective, instead of hanging.

1. Primitive level: ``llmforge.core.distributed.init_distributed(timeout_s=T)`` really bounds a gloo all_reduce.
2. The trainer: two ranks of ``python -m llmforge.train`` (launched as torchrun would, RANK/WORLD_SIZE/MASTER_*),
   rank 1 stuck before its first forward/backward (patched in a tiny wrapper script). Rank 0 must exit non-zero
   within the bound; its stderr should be one ``error:`` line naming the timeout, the collective and the rank.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT, write_synthetic_shards

TIMEOUT_S = 10
BOUND_S = TIMEOUT_S + 50  # rendezvous + imports on a busy 2-core box + the timeout itself


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script_args, world=2, extra_env=None):
    port = _port()
    procs = []
    for r in range(world):
        env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled", RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   **(extra_env or {}))
        env.pop("LLMFORGE_FAULT", None)
        procs.append(subprocess.Popen([sys.executable, *script_args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the stuck rank: ours, started above
        p.wait()


def _wait_rank0(procs, bound):
    t0 = time.time()
    try:
        out, err = procs[0].communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        _reap(procs)
        pytest.fail(f"rank 0 still running after {bound} s: the stuck rank made it hang")
    return procs[0].returncode, out, err, time.time() - t0


PRIMITIVE = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    from llmforge.core.distributed import init_distributed
    info = init_distributed("cpu", "gloo", int(sys.argv[1]))
    dist.barrier()                       # both ranks are up
    if info.rank == 1:
        time.sleep(10**6)                # stops participating
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as e:  # noqa
        print(f"rank {info.rank}: all_reduce failed after {time.time() - t0:.1f}s: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(0)
""")


def test_collective_timeout_bounds_a_stuck_peer(tmp_path):
    script = tmp_path / "stuck_collective.py"
    script.write_text(PRIMITIVE)
    procs = _launch([str(script), str(TIMEOUT_S)])
    try:
        rc, _, err, wall = _wait_rank0(procs, BOUND_S)
    finally:
        _reap(procs)
    assert rc == 3, f"rank 0 did not fail its all_reduce cleanly (rc {rc}):\n{err[-2000:]}"
    line = [ln for ln in err.splitlines() if "all_reduce failed" in ln][0]
    waited = float(line.split("after ")[1].split("s:")[0])
    assert TIMEOUT_S * 0.8 <= waited <= TIMEOUT_S + 15, line
    assert "timed out" in line.lower() or "timeout" in line.lower(), line


WRAPPER = textwrap.dedent("""
    import os, sys, time
    import llmforge.train as T
    from llmforge.train.engines.native import NativeEngine
    if os.environ["RANK"] == os.environ["LLMFORGE_TEST_STUCK_RANK"]:
        def stuck(*a, **k):
            print(f"rank {os.environ['RANK']}: stuck before the step's collectives", file=sys.stderr, flush=True)
            time.sleep(10**6)
        NativeEngine.forward_backward = stuck
    sys.exit(T.main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def stuck_training(tmp_path_factory):
    root = tmp_path_factory.mktemp("hang")
    data = write_synthetic_shards(str(root / "synth"), n_train=40, n_valid=6)
    script = root / "stuck_train.py"
    script.write_text(WRAPPER)
    args = [str(script), os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml"), f"data.paths=[{data}]",
            f"run_dir={root / 'run'}", "model.vocab_size=64", "train.steps=3", "data.seq_len=64",
            f"dist.timeout_s={TIMEOUT_S}", "logging.plot=false"]
    t0 = time.time()
    procs = _launch(args, extra_env={"LLMFORGE_TEST_STUCK_RANK": "1"})
    try:
        rc, out, err, wall = _wait_rank0(procs, BOUND_S + 30)
    finally:
        _reap(procs)
    return {"rc": rc, "out": out, "err": err, "wall": wall, "total": time.time() - t0}


def test_trainer_rank_fails_within_timeout_instead_of_hanging(stuck_training):
    r = stuck_training
    assert r["rc"] != 0, f"rank 0 exited 0 although rank 1 never joined a step:\n{r['err'][-2000:]}"
    assert r["wall"] <= BOUND_S + 30, f"rank 0 took {r['wall']:.0f} s (dist.timeout_s={TIMEOUT_S})"


def test_trainer_timeout_error_is_one_line_naming_rank_and_collective(stuck_training):
    err = stuck_training["err"]
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0].lower()
    assert "rank" in line and ("timed out" in line or "timeout" in line), line
    assert any(op in line for op in ("all_reduce", "allreduce", "collective", "broadcast", "barrier")), line
    assert "rank 0" in line, line
