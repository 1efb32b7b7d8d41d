"""Killing torchrun's agent (kill -9, as when its process group is torn down without the workers) must not leave
workers training into run_dir: they get SIGTERM when the agent dies, save a checkpoint at the step boundary, exit,
and release the run_dir lock; the rerun resumes from that checkpoint."""
import os
import signal
import subprocess
import time

import pytest

from llmforge.core.config import ConfigError
from llmforge.train.run_guard import RunLock
from tests.conftest import ROOT, read_metrics, run_cli, train_cmd


@pytest.mark.slow
def test_workers_follow_a_killed_torchrun_agent(tmp_path, synth_data):
    run_dir = str(tmp_path / "run")
    args = train_cmd(2) + ["configs/train/tiny-cpu.yaml", f"data.paths=[{synth_data}]", f"run_dir={run_dir}",
                           "model.vocab_size=64", "train.steps=100000", "data.seq_len=32", "logging.plot=false",
                           "train.eval_batches=1", "train.global_batch_size=4"]
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    agent = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 240
        while time.time() < deadline and not (os.path.exists(metrics) and max(read_metrics(run_dir), default=0) >= 3):
            time.sleep(0.2)
        assert max(read_metrics(run_dir), default=0) >= 3, "training did not start"
        os.kill(agent.pid, signal.SIGKILL)  # the agent only: its workers are not signalled by anyone else
        agent.wait()
        released, deadline = False, time.time() + 120
        while time.time() < deadline and not released:
            try:
                RunLock(run_dir).acquire().release()
                released = True
            except ConfigError:
                time.sleep(0.5)
        assert released, "the workers kept run_dir locked after their agent died"
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # whatever is left of this test's session
        except ProcessLookupError:
            pass
    ckpts = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step_"))
    assert ckpts, "no checkpoint saved on the way out"
    stopped = int(ckpts[-1].split("_")[1])
    time.sleep(1)
    assert max(read_metrics(run_dir)) == stopped  # nothing trained after the save
    p = run_cli(train_cmd() + args[len(train_cmd(2)):-1] + [f"train.steps={stopped + 1}", "train.global_batch_size=4"])
    assert p.returncode == 0 and f"(step {stopped}," in p.stdout, p.stderr[-2000:]
