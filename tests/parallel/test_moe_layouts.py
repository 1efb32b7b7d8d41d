"""Mixture of experts in every layout equals one process: expert parallelism (experts sharded over ep ranks taken
from dp_shard, tokens exchanged by all-to-all on gloo), with FSDP over the rest, HSDP, TP (with and without
sequence parallelism) and PP. Losses, gradient
norms, final weights (the expert bias too) and the MoE metrics (aux loss, expert load) match to 1e-5; a
checkpoint written under ep2 resumes bitwise under ep2 and equal under ep1."""
from __future__ import annotations

import pytest

from tests.parallel.conftest import losses, max_rel
from tests.parallel.test_layouts import metrics
from tests.parallel.test_layouts import assert_matches_reference

MOE = ["model.preset=tiny-moe"]
EP2 = ["parallel.dp_shard=2", "parallel.zero_stage=3", "parallel.ep=2"]
LAYOUTS = {
    "moe_ep2_dp_shard2": (2, EP2),
    "moe_ep2_dp_shard4": (4, ["parallel.dp_shard=4", "parallel.zero_stage=3", "parallel.ep=2"]),
    "moe_hsdp_ep2": (4, ["parallel.dp_replicate=2", *EP2]),
    "moe_pp2_ep2": (4, ["parallel.pp=2", *EP2]),
    "moe_ep2_tp2": (4, ["parallel.tp=2", *EP2]),          # the MoE runs whole on each tp rank (full sequence)
    "moe_tp2_no_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "moe_zero3_dp2_no_ep": (2, ["parallel.dp_shard=2", "parallel.zero_stage=3"]),
    # the aux loss's gradient is scaled like its micro batch's LM loss; a recomputed block counts its load once
    "moe_ep2_recompute_accum": (2, [*EP2, "recompute=full", "train.micro_batch_size=2"]),
}


def test_mixed_dense_and_moe_blocks_under_ep_match_single_process(runner):
    mixed = [*MOE, "model.moe.dense_layers=1"]
    ref = runner.reference(mixed)
    run_dir = runner.run("moe_first_dense_ep2", 2, [*mixed, *EP2], timeout=300)
    assert_matches_reference(run_dir, ref, "moe_first_dense_ep2", same_eval_windows=False)
    assert_moe_metrics_match(run_dir, ref)


def assert_moe_metrics_match(run_dir: str, ref: str, keys=("moe/aux_loss", "moe/max_load", "moe/dead_experts")):
    got, want = metrics(run_dir), metrics(ref)
    for step in want:
        for key in keys:
            assert key in got[step], (step, key, got[step])
            assert abs(got[step][key] - want[step][key]) <= 1e-5 * max(1.0, abs(want[step][key])), \
                (step, key, got[step][key], want[step][key])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_single_process(runner, name):
    nproc, overrides = LAYOUTS[name]
    ref = runner.reference(MOE)
    run_dir = runner.run(name, nproc, [*MOE, *overrides], timeout=300)
    assert_matches_reference(run_dir, ref, name, same_eval_windows=False)
    assert_moe_metrics_match(run_dir, ref)
    assert "parameters (" in open(f"{run_dir}.rank0.log").read()  # "N parameters (M active)"


def test_bias_balance_under_ep_matches_single_process(runner):
    """DeepSeek-V3's expert bias moves with the global load: the final biases (in the checkpoint) match too."""
    bias = [*MOE, "model.moe.balance=bias", "model.moe.bias_update_rate=0.01"]
    ref = runner.reference(bias)
    run_dir = runner.run("moe_bias_ep2", 2, [*bias, *EP2], timeout=300)
    assert_matches_reference(run_dir, ref, "moe_bias_ep2", same_eval_windows=False)
    assert_moe_metrics_match(run_dir, ref, keys=("moe/max_load", "moe/dead_experts"))
    from tests.parallel.conftest import final_params
    got, want = final_params(run_dir), final_params(ref)
    biases = [k for k in want if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(want[k].abs().sum() > 0 for k in biases)  # they moved
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in biases)


def test_ep2_checkpoint_resumes_bitwise_under_ep2_and_equal_under_ep1(runner):
    full = runner.run("moe_ep2_full", 2, [*MOE, *EP2])
    runner.run("moe_ep2_resume", 2, [*MOE, *EP2, "train.steps=3"])
    resumed = runner.run("moe_ep2_resume", 2, [*MOE, *EP2])
    assert sorted(losses(resumed)) == list(range(1, 7))
    assert losses(resumed) == losses(full)  # bitwise
    runner.run("moe_ep2_then_ep1", 2, [*MOE, *EP2, "train.steps=3"])
    on_one = runner.run("moe_ep2_then_ep1", 1, MOE)
    assert sorted(losses(on_one)) == list(range(1, 7))
    assert max_rel(losses(on_one), losses(runner.reference(MOE))) < 1e-5
