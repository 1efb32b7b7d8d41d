"""Bad MoE / expert-parallel settings are refused in one line before any process group exists: the checks are
arithmetic on the config (``model_args``, ``resolve_dims``), so every rank fails the same way."""
from __future__ import annotations

import os

import pytest

from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.model.presets import model_args
from llmforge.parallel import resolve_dims

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MOE = os.path.join(ROOT, "configs", "train", "tiny-moe.yaml")


def _dims(overrides: list[str], world: int):
    cfg = load_config(RunConfig, TINY_MOE, ["model.vocab_size=64", *overrides])
    margs = model_args(cfg.model)
    return resolve_dims(cfg.parallel, world, margs, cfg.train)


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.zero_stage=3", "model.moe.num_experts=3"], 2,
     "parallel.ep=2 does not divide model.moe.num_experts=3"),
    (["parallel.ep=4", "parallel.dp_shard=2", "parallel.zero_stage=3"], 2, "parallel.ep=4 does not divide parallel.dp_shard=2"),
    (["parallel.ep=2", "parallel.dp_replicate=2"], 2, "use parallel.zero_stage=2 or 3"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.zero_stage=3", "model.moe.num_experts=0",
      "model.preset=tiny"], 2, "the model has none"),
])
def test_bad_expert_parallel_layouts_are_one_line(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        _dims(overrides, world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_good_expert_parallel_layout_resolves():
    dims = _dims(["parallel.ep=2", "parallel.dp_shard=4", "parallel.zero_stage=3", "parallel.tp=2"], 8)
    assert (dims.ep, dims.dp_shard, dims.tp, dims.dp_replicate) == (2, 4, 2, 1)


@pytest.mark.parametrize("overrides,needle", [
    (["model.moe.top_k=9"], "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model.moe.score=relu"], "model.moe.score: 'relu' is not softmax or sigmoid"),
    (["model.moe.balance=capacity"], "model.moe.balance: 'capacity' is not aux_loss, bias or none"),
    (["model.moe.dense_layers=2"], "leaves no MoE block"),
    (["model.family=gpt2"], "model.family=llama"),
])
def test_bad_moe_shapes_are_one_line(overrides, needle):
    cfg = load_config(RunConfig, TINY_MOE, ["model.vocab_size=64", *overrides])
    with pytest.raises(ValueError) as e:
        model_args(cfg.model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_trainer_cli_refuses_before_training(tmp_path, synth_data):
    from tests.conftest import run_cli, train_cmd
    run = str(tmp_path / "run")
    p = run_cli(train_cmd(1) + [TINY_MOE, f"data.paths=[{synth_data}]", f"run_dir={run}", "model.vocab_size=64",
                                  "model.moe.top_k=9"])
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: model.moe.top_k=9 must be between 1 and " \
                                                "model.moe.num_experts=8"
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
