"""launch.torchrun: two torchrun agents as two "nodes" on loopback (c10d rendezvous), and the one-line refusals."""
import os
import socket
import subprocess
import sys

import pytest

from launch.torchrun import free_port
from tests.conftest import ROOT, read_metrics, run_cli

TINY = "configs/train/tiny-cpu.yaml"


def _args(synth, run_dir, *extra):
    return [TINY, f"data.paths=[{synth}]", "model.vocab_size=64", f"run_dir={run_dir}", "train.steps=3",
            "data.seq_len=64", "logging.plot=false", "train.eval_batches=2", "train.warmup_steps=2", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def _two_nodes(synth, run_dir, nproc, *extra):
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "launch.torchrun", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", str(nproc), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "120",
               *_args(synth, run_dir, *extra)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """One process, same seed/data/global batch: what every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref")
    r = run_cli([sys.executable, "-m", "llmforge.train", *_args(synth_data, run_dir)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return read_metrics(run_dir)


def _check(reference, run_dir):
    rows = read_metrics(run_dir)
    assert sorted(rows) == [1, 2, 3]
    diffs = [abs(rows[s]["loss"] - reference[s]["loss"]) for s in rows]
    assert max(diffs) < 1e-5, diffs
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_00000003", "COMPLETE"))
    return diffs


@pytest.mark.slow
def test_two_nodes_data_parallel(synth_data, tmp_path, reference):
    rcs, outs = _two_nodes(synth_data, tmp_path / "run", 1)
    assert rcs == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stdout = outs[0][0] + outs[1][0]
    assert "--nnodes=2" in stdout and "--rdzv-backend=c10d" in stdout   # the printed command
    assert "dp_replicate2" in stdout                                    # dp across the two "nodes"
    _check(reference, tmp_path / "run")


@pytest.mark.slow
def test_two_nodes_dp_across_tp_within(synth_data, tmp_path, reference):
    """4 ranks: torchrun gives each agent a contiguous rank block, tp (innermost mesh dim) stays inside a node."""
    rcs, outs = _two_nodes(synth_data, tmp_path / "run", 2, "parallel.tp=2")
    err = outs[0][1] + outs[1][1]
    if rcs != [0, 0] and ("NotImplementedError" in err or "ImportError" in err):
        pytest.xfail("parallel.tp=2 is not available yet: " + err.strip().splitlines()[-1])
    assert rcs == [0, 0], err[-3000:]
    assert "dp_replicate2 x dp_shard1 x tp2" in outs[0][0] + outs[1][0]
    _check(reference, tmp_path / "run")


# ------------------------------------------------------------------------------ refusals (one line, exit 2)
def _launch(*args):
    return subprocess.run([sys.executable, "-m", "launch.torchrun", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)


def _one_line_error(r, *fragments):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_busy_port_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _launch("--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", TINY)
    _one_line_error(r, f"rendezvous port {port} on 127.0.0.1 is busy")


def test_inconsistent_node_args_refused():
    _one_line_error(_launch("--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29999", TINY),
                    "--node-rank 2 is outside --nnodes 2")
    _one_line_error(_launch("--nnodes", "2", "--node-rank", "1", TINY), "--nnodes 2 needs --rdzv-endpoint")
    _one_line_error(_launch("--rdzv-endpoint", "nohostport", TINY), "is not HOST:PORT")


def test_world_size_mismatch_refused_before_start():
    r = _launch("--nproc-per-node", "3", TINY, "model.vocab_size=64", "parallel.tp=2")
    _one_line_error(r, "world size 3 is not divisible by parallel.pp*tp*dp_shard = 1*2*1")
    r = _launch("--nproc-per-node", "2", TINY, "engine=deepspeed", "parallel.pp=3")
    _one_line_error(r, "world size 2 is not divisible by parallel.pp=3")


def test_dry_run_prints_exact_command_with_free_port():
    r = _launch("--dry-run", "--nproc-per-node", "2", "--max-restarts", "3", TINY, "train.steps=5")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("+ ") and "-m torch.distributed.run" in line and "--max-restarts=3" in line
    assert "--nproc-per-node=2" in line and line.endswith("-m llmforge.train configs/train/tiny-cpu.yaml train.steps=5")
    port = int(line.split("--rdzv-endpoint=127.0.0.1:")[1].split()[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free when chosen


def test_a_run_dir_refused_by_the_workers_is_one_line_and_exit_2(synth_data, tmp_path):
    """Rank 0's one line used to be followed by torchrun's ChildFailedError traceback and exit status 1."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("mine\n")
    r = _launch("--nproc-per-node", "2", *_args(synth_data, user))
    assert r.returncode == 2, r.stderr[-1500:]
    _one_line_error(r, f"run_dir {user} is not empty and was not written by llmforge")
    assert os.listdir(user) == ["config.yaml"]
