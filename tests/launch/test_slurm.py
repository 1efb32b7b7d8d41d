"""A real Slurm cluster (one node, 2 CPUs, its own ports 6917/6918 and munge socket): launch/slurm/train.sbatch
trains the tiny model with srun + torchrun (c10d), preemption requeues and resumes, plain ``srun -n 2 python -m
llmforge.train`` works through env_from_slurm."""
import json
import os
import sys
import time

import pytest

from tests.conftest import ROOT, read_metrics
from launch.torchrun import free_port

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), cpus=2)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


def _args(synth, run_dir, steps, interval):
    return ["configs/train/tiny-cpu.yaml", f"data.paths=[{synth}]", "model.vocab_size=64", f"run_dir={run_dir}",
            f"train.steps={steps}", f"checkpoint.interval={interval}", "train.eval_interval=0",
            "train.eval_batches=2", "logging.plot=false", "data.seq_len=64", "train.warmup_steps=2"]


def _sbatch(slurm, tmp_path, script, args, nproc=2):
    out = str(tmp_path / "slurm-%j.out")
    r = slurm.run(["sbatch", "--parsable", f"--chdir={ROOT}", "--cpus-per-task=2", f"--output={out}",
                   f"--export=ALL,NPROC_PER_NODE={nproc},PYTHONPATH={ROOT},OMP_NUM_THREADS=1,WANDB_MODE=disabled,TMPDIR={tmp_path}",
                   script, *args])
    job = r.stdout.strip().split(";")[0]
    return job, out.replace("%j", job)


def test_train_sbatch_two_procs(slurm, synth_data, tmp_path):
    run_dir = tmp_path / "run"
    job, log = _sbatch(slurm, tmp_path, "launch/slurm/train.sbatch", _args(synth_data, run_dir, 6, 3))
    state = slurm.wait(job, timeout=300)
    text = open(log).read()
    assert state == "COMPLETED", f"job {job} {state}:\n{text[-3000:]}"
    assert "torch.distributed.run" in text and "--rdzv-backend=c10d" in text  # the printed torchrun command
    assert "dp_replicate2" in text  # two ranks trained data-parallel
    rows = read_metrics(run_dir)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_sec"] > 0 for r in rows.values())
    assert rows[6]["loss"] < rows[1]["loss"]
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert "step_00000006" in ckpts and os.path.isfile(run_dir / "checkpoints" / "step_00000006" / "COMPLETE")
    assert json.load(open(run_dir / "checkpoints" / "step_00000006" / "trainer_state.json"))["samples"] == 6 * 8


def test_preemption_requeues_and_resumes(slurm, synth_data, tmp_path):
    """USR1 (what --signal=B:USR1@120 sends before the time limit) → workers stopped, job requeued, resumed."""
    run_dir = tmp_path / "run"
    job, log = _sbatch(slurm, tmp_path, "launch/slurm/train.sbatch", _args(synth_data, run_dir, 400, 5))
    ckroot = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckroot.exists() and any(
            os.path.isfile(ckroot / d / "COMPLETE") for d in os.listdir(ckroot))):
        time.sleep(0.5)
    assert ckroot.exists(), open(log).read()[-3000:]
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    # the trap stops the workers and requeues; Slurm starts a requeued job once its old credential expired
    # (AuthInfo cred_expire, 10 s in the test cluster instead of 120 s)
    deadline = time.time() + 300
    while time.time() < deadline and "resumed from" not in open(log).read():
        time.sleep(1)
    text = open(log).read()
    assert "requeueing job" in text and "restart 1" in text, text[-3000:]  # SLURM_RESTART_COUNT=1
    assert "resumed from" in text, text[-3000:]
    resumed = int(text.split("resumed from")[1].split("(step ")[1].split(",")[0])
    assert resumed >= 5 and resumed % 5 == 0
    slurm.run(["scancel", job])  # a plain scancel (SIGTERM) cancels: no requeue
    assert slurm.wait(job, timeout=120) == "CANCELLED"
    rows = read_metrics(run_dir)
    assert set(range(1, resumed + 1)) <= set(rows)  # rows up to the checkpoint kept, the run continued after it


def test_plain_srun_two_tasks(slurm, synth_data, tmp_path):
    """srun -n 2 python -m llmforge.train: RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/NTASKS/LOCALID."""
    run_dir = tmp_path / "run"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": ROOT,
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = slurm.run(["srun", "-n", "2", "--cpus-per-task=1", sys.executable, "-m", "llmforge.train",
                   *_args(synth_data, run_dir, 4, 0)], cwd=ROOT, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "dp_replicate2" in r.stdout
    rows = read_metrics(run_dir)
    assert sorted(rows) == [1, 2, 3, 4] and rows[4]["tokens"] == 4 * 8 * 64
    assert os.path.isfile(run_dir / "checkpoints" / "step_00000004" / "COMPLETE")


def test_deepspeed_sbatch_two_procs(slurm, synth_data, tmp_path):
    """launch/slurm/deepspeed.sbatch: hostfile from the node list, the deepspeed launcher, engine=deepspeed."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    job, log = _sbatch(slurm, tmp_path, "launch/slurm/deepspeed.sbatch",
                       _args(synth_data, run_dir, 3, 0) + ["parallel.zero_stage=2"])
    state = slurm.wait(job, timeout=400)
    text = open(log).read()
    assert state == "COMPLETED", f"job {job} {state}:\n{text[-3000:]}"
    assert f"{slurm.host} slots=2" in text or "1 hosts x 2 slots" in text
    assert "hostfile" in text and ": ok" in text  # generated, then checked
    assert "ZeRO-2 pp1 x dp2" in text
    rows = read_metrics(run_dir)
    assert sorted(rows) == [1, 2, 3]
    assert open(run_dir / "checkpoints" / "latest").read().strip() == "step_00000003"
