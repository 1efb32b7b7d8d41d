"""SIGTERM to the torchrun of a training run: the workers save and exit 75, and ``launch.torchrun`` exits 75 with
one line (issue 21). Plain torchrun exits 1 with a SignalException traceback there (torch's agent re-raises the
signal as an exception whatever the workers did), which the first test shows on the same run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

TINY = "configs/train/tiny-cpu.yaml"


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_then_sigterm(cmd, run_dir):
    """Start a long run, SIGTERM the launcher once a step is logged, return (rc, stdout, stderr)."""
    p = _start(cmd)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=180)
    return p.returncode, out, err


def _train_args(synth, run_dir):
    return [TINY, f"data.paths=[{synth}]", "model.vocab_size=64", f"run_dir={run_dir}", "train.steps=100000",
            "data.seq_len=64", "logging.plot=false", "train.warmup_steps=2"]


def _saved_step(run_dir):
    steps = sorted(d for d in os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints" / d / "COMPLETE").exists())
    assert steps, "no complete checkpoint after the stop"
    return steps[-1]


@pytest.mark.slow
def test_sigterm_to_torchrun_exits_75_with_one_line(synth_data, tmp_path):
    plain = tmp_path / "plain"  # the repro: plain torchrun, the same stop
    rc, out, err = _train_then_sigterm([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node=2", "-m", "llmforge.train", *_train_args(synth_data, plain)],
                                       plain)
    assert "exit status 75" in out and _saved_step(plain)  # the workers did save...
    assert rc == 1 and "SignalException" in err            # ...but torchrun says failure, with a traceback

    run = tmp_path / "run"
    rc, out, err = _train_then_sigterm([sys.executable, "-m", "launch.torchrun", "--nproc-per-node", "2",
                                        *_train_args(synth_data, run)], run)
    assert rc == 75, err[-3000:]
    assert err.strip().splitlines() == [
        "launch.torchrun: stopped by SIGTERM: every worker saved a checkpoint and exited 75; rerun the same command "
        "to resume (exit status 75)"], err
    step = int(_saved_step(run).split("_")[1])
    assert f"stopped by SIGTERM after step {step}: checkpoint saved" in out


def _fake_workers(mode, nproc, *extra):
    """launch.torchrun over tests/launch/_signal_worker.py; returns the process once every worker is ready."""
    p = _start([sys.executable, "-m", "launch.torchrun", "--nproc-per-node", str(nproc), "--skip-checks",
                "--module", "tests.launch._signal_worker", *extra, TINY, mode])
    pids = []
    while len(pids) < nproc:
        line = p.stdout.readline()
        assert line, p.communicate()
        if line.startswith("ready "):
            pids.append(int(line.split()[1]))
    return p, pids


def test_a_worker_that_does_not_stop_in_time_is_named_not_reported_as_saved():
    p, _ = _fake_workers("stubborn", 1, "--shutdown-timeout", "2")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "launch.torchrun: stopped by SIGTERM, not every worker saved; worker exit statuses by local rank: 0: -9 "
        "(exit status 143)"), err


def test_workers_stopped_directly_exit_75_through_the_launcher():
    """SIGTERM to the workers only (torchrun sees them fail with 75: ChildFailedError) -> 75 and one line too."""
    p, pids = _fake_workers("saves", 1)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 75, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "launch.torchrun: the workers were stopped by a signal: every worker saved a checkpoint and exited 75"), err
