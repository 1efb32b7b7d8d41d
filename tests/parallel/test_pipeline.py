"""Pipeline parallelism: every torch.distributed.pipelining schedule at pp=2 equals one process (loss, gradient
norm, final parameters, validation loss), plus the stage split and the microbatch rules checked without processes."""
from __future__ import annotations

import pytest

from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.model.presets import PRESETS
from llmforge.parallel import resolve_dims
from llmforge.parallel.pipeline import split_units, stage_ids

from tests.parallel.conftest import CONFIG
from tests.parallel.test_layouts import assert_matches_reference

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_single_process(runner, schedule):
    ref = runner.reference()
    run_dir = runner.run(f"pp2_{schedule}", 2, ["parallel.pp=2", f"parallel.pp_schedule={schedule}"])
    assert_matches_reference(run_dir, ref, f"pp2 {schedule}", same_eval_windows=True)


def test_mid_run_evaluation_under_pp_leaves_training_unchanged(runner):
    """Validation between steps (its own forward-only pass over the stages) must not disturb the schedule."""
    ref = runner.reference()
    run_dir = runner.run("pp2_zbv_eval", 2, ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble",
                                             "train.eval_interval=2"])
    assert_matches_reference(run_dir, ref, "pp2 ZBV with eval every 2 steps", same_eval_windows=True)


def test_split_units_and_stage_placement():
    assert split_units(2, 2) == [["0"], ["1"]]
    assert split_units(5, 2) == [["0", "1", "2"], ["3", "4"]]
    # more stages than layers: the embedding and the output head get stages of their own
    assert split_units(2, 4) == [["emb"], ["0"], ["1"], ["out"]]
    assert split_units(3, 4) == [["emb", "0"], ["1"], ["2"], ["out"]]
    assert stage_ids("1F1B", 4, 1, 1) == [1]
    assert stage_ids("Interleaved1F1B", 2, 1, 2) == [1, 3]  # loop
    assert stage_ids("ZBVZeroBubble", 2, 0, 2) == [0, 3]    # V: first and last stage on rank 0
    assert stage_ids("DualPipeV", 4, 1, 2) == [1, 6]


def _dims(*overrides, world=2):
    cfg = load_config(RunConfig, CONFIG, ["model.vocab_size=64", *overrides])
    import dataclasses
    args = dataclasses.replace(PRESETS["tiny"], vocab_size=64)
    return resolve_dims(cfg.parallel, world, args, cfg.train, cfg.recompute)


def test_microbatch_defaults_and_rules():
    # contract default (tiny preset, 1F1B, global batch 8): the fewest microbatches 1F1B accepts
    assert _dims("parallel.pp=2").pp_microbatches == 2
    assert _dims("parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B").pp_microbatches == 4
    assert _dims("parallel.pp=2", "train.micro_batch_size=1").pp_microbatches == 8
    assert _dims("parallel.pp=2", "parallel.pp_microbatches=8").pp_microbatches == 8
    errors = {
        ("parallel.pp=2", "parallel.pp_microbatches=1"): "needs at least 2 microbatches",
        ("parallel.pp=2", "parallel.pp_microbatches=3"): "do not divide the per-rank batch 8",
        ("parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_microbatches=2"): "at least 4 microbatches",
        ("parallel.pp=2", "parallel.pp_microbatches=4", "train.micro_batch_size=4"): "!= per-rank batch 8",
        ("parallel.pp=2", "parallel.pp_schedule=Nope"): "unknown",
        ("parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "recompute=selective"): "recompute=full",
        ("parallel.pp=2", "parallel.pp_schedule=InterleavedZeroBubble", "parallel.compile=true"): "compile=false",
        ("parallel.pp=3",): "exceeds model n_layers=2",
    }
    for overrides, message in errors.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("!", "!")):
            _dims(*overrides, world=3 if "parallel.pp=3" in overrides else 2)
