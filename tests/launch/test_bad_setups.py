"""Bad launch setups give one clear error line: Slurm variables partially set, hostfile entries missing,
world size that does not fit the layout. Plus the Slurm node-list expansion behind the hostfile."""
import os
import subprocess
import sys

import pytest

from launch.hostfile import HostfileError, check_hostfile, expand_nodelist, read_hostfile, write_hostfile
from llmforge.core.distributed import LaunchError, env_from_slurm
from tests.conftest import ROOT

TINY = "configs/train/tiny-cpu.yaml"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, WANDB_MODE="disabled", **extra)
    return env


def _run(args, env, timeout=120):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_slurm_procid_without_ntasks_is_one_line(synth_data, tmp_path):
    with pytest.raises(LaunchError, match="SLURM_NTASKS, SLURM_LOCALID not set"):
        env_from_slurm({"SLURM_PROCID": "0"})
    r = _run([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
              f"run_dir={tmp_path}/r", "train.steps=1"], _clean_env(SLURM_PROCID="1", SLURM_LOCALID="0"))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: Slurm launch: SLURM_NTASKS not set (have SLURM_PROCID); start with srun"
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")


def test_slurm_multi_task_without_master_addr(synth_data, tmp_path):
    r = _run([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
              f"run_dir={tmp_path}/r", "train.steps=1"],
             _clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "set MASTER_ADDR" in r.stderr


def test_world_size_mismatch_under_srun_env(synth_data, tmp_path):
    """3 tasks for a tp=2 layout: refused before any collective (no MASTER needed to get the message)."""
    r = _run([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
              f"run_dir={tmp_path}/r", "parallel.tp=2"],
             _clean_env(SLURM_PROCID="0", SLURM_NTASKS="3", SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT="1"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: world size 3 is not divisible by parallel.pp*tp*dp_shard = 1*2*1; "
                                "launch a multiple of 2 processes")


def test_expand_nodelist_like_scontrol():
    assert expand_nodelist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert expand_nodelist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    assert expand_nodelist("node9") == ["node9"]
    with pytest.raises(HostfileError, match="unbalanced"):
        expand_nodelist("gpu[01-03")
    with pytest.raises(HostfileError, match="bad range"):
        expand_nodelist("gpu[05-01]")


def test_hostfile_written_from_slurm_nodelist(tmp_path):
    out = tmp_path / "hostfile"
    env = _clean_env(SLURM_JOB_NODELIST="gpu[001-002],gpu010")
    env["PATH"] = "/usr/bin/nonexistent:/bin"  # no scontrol: the Python expansion is used
    r = _run([sys.executable, "-m", "launch.hostfile", "--slots", "8", "-o", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "gpu001 slots=8\ngpu002 slots=8\ngpu010 slots=8\n"
    assert read_hostfile(str(out)) == {"gpu001": 8, "gpu002": 8, "gpu010": 8}


def test_hostfile_entry_missing_is_one_line(tmp_path):
    hf = tmp_path / "hostfile"
    write_hostfile(str(hf), ["gpu001", "gpu002"], 8)
    env = _clean_env(SLURM_JOB_NODELIST="gpu[001-003]")
    env["PATH"] = "/bin"
    r = _run([sys.executable, "-m", "launch.hostfile", "--check", str(hf), "--slots", "8"], env)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: hostfile {hf} has no entry for host gpu003 (it lists gpu001, gpu002); "
                                "regenerate it with python -m launch.hostfile")
    with pytest.raises(HostfileError, match="expected slots=4 for every host, got gpu001 slots=8"):
        check_hostfile(str(hf), ["gpu001"], slots=4)
    hf.write_text("gpu001 slots=8\ngpu002 slotz=8\n")
    with pytest.raises(HostfileError, match=r"hostfile:2: expected 'HOST slots=N'"):
        read_hostfile(str(hf))


def test_hostfile_without_slurm_allocation():
    r = _run([sys.executable, "-m", "launch.hostfile", "--slots", "2"], _clean_env())
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: no node list: SLURM_JOB_NODELIST is not set")
