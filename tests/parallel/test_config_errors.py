"""Impossible layouts fail before any collective: non-zero exit, one clear line, no run directory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.parallel.conftest import BASE, CONFIG, ROOT


def _check_one_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_tp3_on_one_process_via_cli(tmp_path, synth_data):
    """The real command line (fresh interpreter): tp=3 cannot fit one process."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled")
    env.pop("LLMFORGE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "llmforge.train", CONFIG, *BASE, f"data.paths=[{synth_data}]",
                        f"run_dir={run_dir}", "parallel.tp=3"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 2
    _check_one_line(p.stderr, "world size 1", "parallel.pp*tp*dp_shard")
    assert not run_dir.exists()


@pytest.mark.parametrize("nproc,overrides,needles", [
    (2, ["parallel.dp_replicate=3"], ("world size 2 != parallel.pp*dp_replicate*dp_shard*tp",)),
    (3, ["parallel.tp=3"], ("parallel.tp=3 does not divide model n_heads=4",)),
    (2, ["parallel.pp=2", "parallel.pp_microbatches=1"], ("1F1B needs at least 2 microbatches",)),
    (2, ["parallel.zero_stage=1", "parallel.tp=2"], ("zero_stage=1 with parallel.tp>1",)),
    (2, ["parallel.tp=2", "data.seq_len=63"], ("data.seq_len=63 is not divisible by parallel.tp=2",)),
    (2, ["parallel.cp=2", "data.seq_len=66"], ("data.seq_len=66 is not divisible by 2 x parallel.cp = 4",)),
    (2, ["parallel.cp=2", "model.preset=tiny-moe"], ("parallel.cp=2 with a mixture-of-experts model",)),
], ids=["world_size_mismatch", "tp_not_dividing_heads", "too_few_microbatches", "zero1_with_tp", "sp_odd_seq",
        "cp_seq_not_divisible", "cp_with_moe"])
def test_layout_errors_on_every_rank(runner, nproc, overrides, needles):
    name = "err_" + "_".join(o.replace("parallel.", "").replace("=", "") for o in overrides)
    run_dir = runner.run(name, nproc, overrides, expect_ok=False, timeout=60)
    rcs = runner.last_exit_codes
    assert rcs == [2] * nproc
    _check_one_line(open(f"{run_dir}.rank0.log").read(), *needles)
    for r in range(1, nproc):  # only rank 0 prints a configuration error
        assert open(f"{run_dir}.rank{r}.log").read().strip() == ""
    assert not os.path.exists(run_dir)
