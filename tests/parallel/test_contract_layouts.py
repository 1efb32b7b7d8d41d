"""The shared contract, through the real launcher: ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m llmforge.train`` with the tiny-cpu preset's defaults (1F1B, global batch 8, seq_len 128), seed 11, 8 steps:
dp2, ZeRO-3 dp_shard=2, tp2 and pp2 equal ``python -m llmforge.train`` on one process within 1e-5 relative."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.parallel.conftest import CONFIG, ROOT, losses, max_rel

COMMON = ["model.vocab_size=64", "seed=11", "train.steps=8", "train.eval_interval=0", "checkpoint.interval=0",
          "logging.plot=false"]
CONTRACT = {
    "dp2": ["parallel.dp_replicate=2"],
    "zero3_dp_shard2": ["parallel.dp_shard=2", "parallel.zero_stage=3"],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
}


def _run(cmd: list[str], run_dir: str, data: str, overrides: list[str] = ()) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled")
    p = subprocess.run([*cmd, CONFIG, *COMMON, f"data.paths=[{data}]", f"run_dir={run_dir}", *overrides],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


@pytest.fixture(scope="module")
def contract_reference(tmp_path_factory, synth_data) -> str:
    run_dir = str(tmp_path_factory.mktemp("contract") / "single")
    _run([sys.executable, "-m", "llmforge.train"], run_dir, synth_data)
    return run_dir


@pytest.mark.parametrize("layout", list(CONTRACT))
def test_contract_layout_via_torchrun(layout, contract_reference, synth_data, tmp_path):
    run_dir = str(tmp_path / layout)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "llmforge.train"], run_dir, synth_data, CONTRACT[layout])
    got, want = losses(run_dir), losses(contract_reference)
    rel = max_rel(got, want)
    print(f"RESULT torchrun {layout}: max rel loss diff {rel:.2e} over {len(want)} steps")
    assert len(got) == 8 and rel < 1e-5
