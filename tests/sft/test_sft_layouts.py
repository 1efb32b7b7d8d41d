"""Masked SFT loss is layout-independent: ddp2, zero3, tp2, pp2, cp2 equal one process (losses and validation),
and a fine-tuning run killed with SIGKILL resumes to the same metrics bitwise."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.parallel.conftest import max_rel, param_max_diff
from tests.sft.conftest import assert_killed_run_resumes_bitwise, train

SFT = "configs/train/sft-tiny.yaml"


def _args(sft_env, pre_run, *extra):
    return [f"train.init_from={pre_run}", f"data.paths=[{sft_env['data']}]", "data.seq_len=32", "train.steps=4",
            "train.global_batch_size=8", "train.lr=3e-3", "train.warmup_steps=1",
            "train.eval_interval=2", "train.eval_batches=1", "checkpoint.interval=0", "seed=5", *extra]


def _metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


@pytest.fixture(scope="module")
def reference(sft_env, pre_run, tmp_path_factory):
    run = train(str(tmp_path_factory.mktemp("ref") / "run"), SFT, *_args(sft_env, pre_run))
    return run, _metrics(run)


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [
    ("ddp2", []),
    ("zero3", ["parallel.zero_stage=3"]),
    ("tp2", ["parallel.tp=2"]),
    ("pp2", ["parallel.pp=2", "parallel.pp_schedule=1F1B"]),
    ("cp2", ["parallel.cp=2"]),  # each conversation split over 2 ranks; its response tokens counted once
])
def test_layout_equals_one_process(sft_env, pre_run, reference, tmp_path, name, layout):
    from tests.parallel.conftest import final_params
    ref_dir, (ref_loss, ref_val) = reference  # one process, one micro batch of 8 conversations per step
    # micro batches of 2 conversations with different response lengths: a mean of per-micro-batch means would
    # differ from the reference; the global response-token normalisation does not.
    run = train(str(tmp_path / name), SFT, *_args(sft_env, pre_run, "train.micro_batch_size=2", *layout), nproc=2)
    loss, val = _metrics(run)
    assert max_rel(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert max_rel(val, ref_val) <= 1e-5, (val, ref_val)
    assert param_max_diff(final_params(run), final_params(ref_dir)) < 1e-4


@pytest.mark.slow
def test_kill_9_then_rerun_is_bitwise_identical(sft_env, pre_run, tmp_path):
    assert_killed_run_resumes_bitwise(str(tmp_path), SFT, _args(sft_env, pre_run, "train.steps=6",
                                                                 "checkpoint.interval=2"))


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [
    ("tp2", ["parallel.tp=2"]),  # torch's SequenceParallel re-registers norm weights: they must stay frozen
    ("pp2", ["parallel.pp=2", "train.micro_batch_size=2"]),  # stage 0 has nothing to train: no optimizer state
])
def test_freeze_holds_in_parallel_layouts(sft_env, pre_run, tmp_path, name, layout):
    from tests.parallel.conftest import final_params
    run = train(str(tmp_path / name), SFT, *_args(sft_env, pre_run, "train.steps=3", "checkpoint.interval=2",
                                                  "train.freeze=[embeddings,blocks:1]", *layout), nproc=2)
    before, after = final_params(pre_run), final_params(run)
    frozen = [k for k in before if k.startswith(("tok_embeddings.", "layers.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["layers.1.attention.wq.weight"], after["layers.1.attention.wq.weight"])
