"""engine: deepspeed — generated config, validation, equivalence with the native engine, checkpoints/resume.

The multi-process part starts the real ``deepspeed`` launcher once (``--num_gpus 2`` with DS_ACCELERATOR=cpu)
and runs, in the same two processes: native DDP, DeepSpeed ZeRO-1/2/3, PipelineModule pp2 with ZeRO-0/1, and a
ZeRO-2 run interrupted after 3 steps and resumed to 6 next to an uninterrupted 6-step run.
"""
import json
import os
import shutil
import sys

import pytest
import torch

from llmforge.config import ConfigError, RunConfig, load_config
from llmforge.engines.deepspeed import ds_config
from launch.torchrun import free_port
from tests.conftest import ROOT, read_metrics, run_cli

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")

TINY = os.path.join(ROOT, "configs/train/tiny-cpu.yaml")


def cfg(*overrides):
    return load_config(RunConfig, TINY, ["model.vocab_size=64", *overrides])


def test_generated_config_from_ours():
    c = ds_config(cfg("parallel.zero_stage=2", "train.global_batch_size=16", "train.micro_batch_size=2",
                      "train.grad_clip=0.5"), world=4)
    assert c["train_batch_size"] == 16 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["gradient_accumulation_steps"] == 2  # 16 / (2 * dp 4)
    assert c["zero_optimization"] == {"stage": 2} and c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": False} and "optimizer" not in c  # client torch AdamW, our LR schedule
    c = ds_config(cfg("parallel.zero_stage=3", "parallel.pp=1"), world=2, dtype=torch.bfloat16)
    assert c["bf16"]["enabled"] is True and c["zero_optimization"]["stage"] == 3


def test_raw_dict_merged_and_offload_optimizer():
    c = ds_config(cfg("parallel.zero_stage=2", "deepspeed.zero_optimization.overlap_comm=true",
                      "deepspeed.zero_optimization.offload_optimizer.device=cpu", "deepspeed.steps_per_print=5"),
                  world=2)
    z = c["zero_optimization"]
    assert z["stage"] == 2 and z["overlap_comm"] is True and z["offload_optimizer"] == {"device": "cpu"}
    assert c["steps_per_print"] == 5
    # offload needs DeepSpeed's CPU Adam: generated with our hyper-parameters
    assert c["optimizer"]["type"] == "AdamW"
    assert c["optimizer"]["params"]["lr"] == 3e-3 and c["optimizer"]["params"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_optimisation.stage=2"], "unknown DeepSpeed config key 'deepspeed.zero_optimisation'; "
                                              "did you mean deepspeed.zero_optimization"),
    (["deepspeed.train_batch_size=32"], "deepspeed.train_batch_size=32 conflicts with train.*"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "supports ZeRO stage 0 or 1 only"),
    (["parallel.tp=2"], "no tensor parallelism"),
    (["parallel.pp=2"], "world size 3 is not divisible by parallel.pp=2"),
    (["deepspeed.zero_optimization.offload_optimizer.device=cpu"], "needs parallel.zero_stage >= 1"),
])
def test_bad_deepspeed_configs_one_line(overrides, message):
    world = 3 if "parallel.pp=2" in overrides and len(overrides) == 1 else 2
    with pytest.raises(ConfigError) as e:
        ds_config(cfg(*overrides), world=world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_unknown_key_is_one_line_error(synth_data, tmp_path):
    r = run_cli([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
                 f"run_dir={tmp_path}/r", "engine=deepspeed", "deepspeed.bogus_key=1"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown DeepSpeed config key 'deepspeed.bogus_key'"


def test_single_process_equals_native(synth_data, tmp_path):
    common = [TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64", "train.steps=3", "data.seq_len=64",
              "train.micro_batch_size=4", "logging.plot=false", "train.eval_batches=2"]
    runs = {"native": ["engine=native"], "deepspeed": ["engine=deepspeed"],
            # ZeRO-2 with the optimizer offloaded to CPU: DeepSpeedCPUAdam (prebuilt op), same hyper-parameters
            "offload": ["engine=deepspeed", "parallel.zero_stage=2",
                        "deepspeed.zero_optimization.offload_optimizer.device=cpu"]}
    for name, ov in runs.items():
        r = run_cli([sys.executable, "-m", "llmforge.train", *common, f"run_dir={tmp_path}/{name}", *ov],
                    timeout=300, env={"DS_ACCELERATOR": "cpu"})
        assert r.returncode == 0, r.stderr[-3000:]
    nat = read_metrics(tmp_path / "native")
    for name in ("deepspeed", "offload"):
        ds = read_metrics(tmp_path / name)
        assert sorted(ds) == [1, 2, 3]
        for s in (1, 2, 3):
            assert abs(nat[s]["loss"] - ds[s]["loss"]) < 1e-5, (name, s)
            assert abs(nat[s]["grad_norm"] - ds[s]["grad_norm"]) < 1e-4 and nat[s]["lr"] == ds[s]["lr"]
    assert json.load(open(tmp_path / "offload" / "deepspeed_config.json"))["optimizer"]["type"] == "AdamW"
    ds = read_metrics(tmp_path / "deepspeed")
    assert set(nat[1]) <= set(ds[1])  # the same metrics row keys
    conf = json.load(open(tmp_path / "deepspeed" / "deepspeed_config.json"))
    assert conf["gradient_accumulation_steps"] == 2 and conf["zero_optimization"]["stage"] == 0
    assert open(tmp_path / "deepspeed" / "checkpoints" / "latest").read().strip() == "step_00000003"


# ---------------------------------------------------------------------------------------- 2 processes
RUNS = {
    "native": [], "z1": ["engine=deepspeed", "parallel.zero_stage=1"],
    "z2": ["engine=deepspeed", "parallel.zero_stage=2"], "z3": ["engine=deepspeed", "parallel.zero_stage=3"],
    "pp0": ["engine=deepspeed", "parallel.pp=2"], "pp1": ["engine=deepspeed", "parallel.pp=2", "parallel.zero_stage=1"],
    "full6": ["engine=deepspeed", "parallel.zero_stage=2", "train.steps=6"],
    "resume": ["engine=deepspeed", "parallel.zero_stage=2", "train.steps=3"],
}


@pytest.fixture(scope="module")
def ds_launch(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds2")
    common = [f"data.paths=[{synth_data}]", "model.vocab_size=64", "train.steps=4", "data.seq_len=64",
              "train.micro_batch_size=2", "logging.plot=false", "train.warmup_steps=2", "train.eval_batches=2",
              "train.schedule=constant", "checkpoint.keep=1"]
    runs = [[f"run_dir={out / name}", *ov] for name, ov in RUNS.items()]
    runs.append([f"run_dir={out / 'resume'}", *RUNS["resume"][:-1], "train.steps=6"])  # resume 3 → 6
    spec = out / "spec.json"
    spec.write_text(json.dumps({"config": "configs/train/tiny-cpu.yaml", "common": common, "runs": runs}))
    if not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher is not on PATH")
    r = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
                 "tests/engines/ds_runs.py", str(spec)], timeout=900, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z1", "z2", "z3", "pp0", "pp1"])
def test_two_process_losses_equal_native(ds_launch, name):
    out, stdout = ds_launch
    nat, ds = read_metrics(out / "native"), read_metrics(out / name)
    assert sorted(ds) == [1, 2, 3, 4]
    diffs = [abs(nat[s]["loss"] - ds[s]["loss"]) for s in ds]
    assert max(diffs) < 1e-5, diffs
    assert max(abs(nat[s]["grad_norm"] - ds[s]["grad_norm"]) for s in ds) < 1e-4
    assert ds[4]["loss"] < ds[1]["loss"] and ds[4]["tokens"] == 4 * 8 * 64
    # validation at the end, through the engine (PipelineEngine.eval_batch under pp)
    val = [json.loads(line) for line in open(out / name / "metrics.jsonl") if "val_loss" in line]
    nat_val = [json.loads(line) for line in open(out / "native" / "metrics.jsonl") if "val_loss" in line]
    assert abs(val[-1]["val_loss"] - nat_val[-1]["val_loss"]) < 1e-5


@pytest.mark.slow
def test_two_process_checkpoint_resume(ds_launch):
    out, stdout = ds_launch
    full, res = read_metrics(out / "full6"), read_metrics(out / "resume")
    assert sorted(res) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl continues after the resume
    assert "resumed from" in stdout and "(step 3, 24 samples consumed)" in stdout
    for s in range(1, 7):
        assert abs(full[s]["loss"] - res[s]["loss"]) < 1e-6, (s, full[s]["loss"], res[s]["loss"])
    root = out / "resume" / "checkpoints"
    assert open(root / "latest").read().strip() == "step_00000006"
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_00000006"]  # keep=1
    files = os.listdir(root / "step_00000006")
    assert any("optim_states" in f for f in files) and len([f for f in files if "optim_states" in f]) == 2  # ZeRO-2 shards
