"""Muon in every layout equals single-process Muon: each Newton-Schulz runs on the whole matrix (FSDP and TP
shards are gathered; every rank keeps its shard of the result), so losses, gradient norms and final weights
match one process as AdamW's do (tests/parallel/test_layouts.py)."""
from __future__ import annotations

import pytest

from tests.parallel.test_layouts import PP2, TP2, Z3, assert_matches_reference

MUON = ["train.optimizer=muon"]
LAYOUTS = {
    "muon_ddp2": (2, ["parallel.dp_replicate=2"]),
    "muon_zero3_dp2": (2, Z3),
    "muon_tp2": (2, TP2),
    "muon_pp2": (2, PP2),
    "muon_hsdp_2x2": (4, ["parallel.dp_replicate=2", *Z3]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_muon_layout_matches_single_process_muon(runner, name):
    nproc, overrides = LAYOUTS[name]
    ref = runner.reference(MUON)
    run_dir = runner.run(name, nproc, [*MUON, *overrides], timeout=300)
    dp = nproc // (2 if "parallel.pp=2" in overrides else 1) // (2 if "parallel.tp=2" in overrides else 1)
    assert_matches_reference(run_dir, ref, name, same_eval_windows=dp == 1)


def test_a_muon_zero3_checkpoint_resumes_on_one_process(runner):
    """DCP reshards Muon's momentum and AdamW's moments by name: 3 steps under ZeRO-3 dp2, then 3 more on one
    process, equal the single-process run (all 6 steps are warmup: the schedule does not depend on train.steps)."""
    from tests.parallel.conftest import losses, max_rel
    ref = runner.reference(MUON)
    runner.run("muon_zero3_then_single", 2, [*MUON, *Z3, "train.steps=3"])
    run_dir = runner.run("muon_zero3_then_single", 1, [*MUON, "train.steps=6"])
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert max_rel(got, losses(ref)) < 1e-5
