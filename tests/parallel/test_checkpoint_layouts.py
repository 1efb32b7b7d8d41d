"""Save under one layout, resume under another: the continued run equals an uninterrupted single process.

Layout A trains 6 steps with ``checkpoint.interval=3``; its step-3 checkpoint is copied into a fresh run dir where
layout B resumes and runs steps 4-6. B's losses (and final parameters) must match the single-process run's steps
4-6: model weights, AdamW moments and step counts, LR schedule position and the data stream (global sample index,
also when the data-parallel size changes: a repeated or skipped sample would change the loss) all carry over.
"""
from __future__ import annotations

import os
import shutil

import pytest

from llmforge.train.run_guard import RUN_MARKER
from tests.parallel.conftest import final_params, losses, max_rel, param_max_diff

CASES = {  # name: ((processes, overrides) saving, (processes, overrides) resuming)
    "dp2_to_tp2": ((2, ["parallel.dp_replicate=2"]), (2, ["parallel.tp=2"])),                      # dp 2 -> 1
    "pp2_to_dp2_tp2": ((2, ["parallel.pp=2"]), (4, ["parallel.tp=2"])),                             # dp 1 -> 2
    "zero3_to_zero1": ((2, ["parallel.dp_shard=2", "parallel.zero_stage=3"]), (2, ["parallel.zero_stage=1"])),
    "zero1_to_single": ((2, ["parallel.zero_stage=1"]), (1, [])),                                  # ZeRO-1 shards
    "pp2_zbv_to_zero2_tp2": ((2, ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble"]),
                             (4, ["parallel.tp=2", "parallel.dp_shard=2", "parallel.zero_stage=2"])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_another_layout(runner, name):
    (na, a), (nb, b) = CASES[name]
    ref = losses(runner.reference())
    saved = runner.run(f"{name}_save", na, [*a, "checkpoint.interval=3"])
    resumed = os.path.join(runner.root, f"{name}_resume")
    shutil.copytree(os.path.join(saved, "checkpoints", "step_00000003"),
                    os.path.join(resumed, "checkpoints", "step_00000003"))
    shutil.copy(os.path.join(saved, RUN_MARKER), resumed)  # a run dir llmforge made (else refused as the user's)
    runner.run(f"{name}_resume", nb, b)
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    rel = max_rel(got, {k: ref[k] for k in got})
    pdiff = param_max_diff(final_params(resumed), final_params(runner.reference()))
    log = open(f"{resumed}.rank0.log").read()
    print(f"RESULT resume {name}: max rel loss diff {rel:.2e} on steps 4-6, final params max abs diff {pdiff:.2e}")
    assert "resumed from" in log and "24 samples consumed" in log
    assert rel < 1e-5, (got, ref)
    assert pdiff < 1e-4
