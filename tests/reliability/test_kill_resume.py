"""kill -9 the trainer (between steps and inside a checkpoint write), rerun the same command: the metrics equal an
uninterrupted run bitwise; incomplete or corrupt checkpoints are skipped with a warning, never loaded."""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT, read_metrics, run_cli, train_cmd

TINY = "configs/train/tiny-cpu.yaml"
STEPS = 12


def _args(run_dir, data, *extra):
    return train_cmd() + [TINY, f"data.paths=[{data}]", f"run_dir={run_dir}", "model.vocab_size=64",
                          f"train.steps={STEPS}", "train.eval_interval=4", "checkpoint.interval=3",
                          "checkpoint.keep=2", *extra]


def _curve(run_dir):
    """Everything deterministic in metrics.jsonl (timings excluded), in file order."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_data):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    p = run_cli(_args(run_dir, synth_data))
    assert p.returncode == 0, p.stderr
    return _curve(run_dir)


def _kill_when(run_dir, args, step, sig=signal.SIGKILL, out=None):
    """Start training and send ``sig`` (SIGKILL) from outside once metrics.jsonl has reached ``step``."""
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(path) and max(read_metrics(run_dir), default=0) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_between_steps_then_rerun_is_bitwise_identical(tmp_path, synth_data, reference, trial):
    step = random.Random(trial).randint(2, STEPS - 2)
    run_dir = str(tmp_path / "run")
    args = _args(run_dir, synth_data)
    assert _kill_when(run_dir, args, step) == -signal.SIGKILL
    p = run_cli(args)
    assert p.returncode == 0, p.stderr
    assert _curve(run_dir) == reference


def test_sigkill_inside_checkpoint_write(tmp_path, synth_data, reference):
    run_dir = str(tmp_path / "run")
    p = run_cli(_args(run_dir, synth_data), env={"LLMFORGE_FAULT": "kill_in_save@6"})
    assert p.returncode == -signal.SIGKILL
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert "step_00000003" in ckpts and "step_00000006" not in ckpts and ".step_00000006.tmp" in ckpts
    p = run_cli(_args(run_dir, synth_data))
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    assert _curve(run_dir) == reference
    assert not [c for c in os.listdir(os.path.join(run_dir, "checkpoints")) if c.startswith(".")]


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, synth_data):
    run_dir = str(tmp_path / "run")
    assert _kill_when(run_dir, _args(run_dir, synth_data), 7) == -signal.SIGKILL
    ck = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ck)) == ["step_00000003", "step_00000006"]
    victim = next(f for f in sorted(os.listdir(os.path.join(ck, "step_00000006"))) if f.endswith(".distcp"))
    with open(os.path.join(ck, "step_00000006", victim), "r+b") as f:
        f.truncate(10)
    p = run_cli(_args(run_dir, synth_data))
    assert p.returncode == 0, p.stderr
    assert "skipping checkpoint" in p.stdout and victim in p.stdout
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_saves_exits_75_and_resumes_bitwise(tmp_path, synth_data, reference, sig):
    """What Slurm / cloud schedulers send before a kill: finish the step, checkpoint, exit 75 (requeue), resume."""
    from llmforge.train.run_guard import PREEMPTED_EXIT
    run_dir = str(tmp_path / "run")
    args = _args(run_dir, synth_data)
    with open(tmp_path / "log", "w") as log:
        rc = _kill_when(run_dir, args, 4, sig, out=log)
    text = open(tmp_path / "log").read()
    assert rc == PREEMPTED_EXIT, text[-2000:]
    line = [ln for ln in text.splitlines() if ln.startswith("stopped by")][0]
    assert signal.Signals(sig).name in line and "rerun the same command to resume" in line
    stopped_at = int(line.split("after step ")[1].split(":")[0])
    assert f"step_{stopped_at:08d}" in os.listdir(os.path.join(run_dir, "checkpoints"))
    p = run_cli(args)
    assert p.returncode == 0, p.stderr
    assert f"(step {stopped_at}," in p.stdout
    assert _curve(run_dir) == reference
