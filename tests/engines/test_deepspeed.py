"""engine: deepspeed — generated config, validation, equivalence with the native engine, checkpoints/resume.

The multi-process part starts the real ``deepspeed`` launcher once (``--num_gpus 2`` with DS_ACCELERATOR=cpu)
and runs, in the same two processes: native DDP, DeepSpeed ZeRO-1/2/3, PipelineModule pp2 with ZeRO-0/1, and a
ZeRO-2 run interrupted after 3 steps and resumed to 6 next to an uninterrupted 6-step run.
"""
import json
import math
import os
import shutil
import sys

import pytest
import torch

from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.train.engines.deepspeed import ds_config
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
    "z2_rc": ["engine=deepspeed", "parallel.zero_stage=2", "recompute=full"],
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
@pytest.mark.parametrize("name", ["z1", "z2", "z3", "pp0", "pp1", "z2_rc"])
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


@pytest.mark.slow
def test_plain_deepspeed_launcher_line(ds_launch, synth_data, tmp_path):
    """`deepspeed --num_gpus 2 --module llmforge.train CONFIG ...` as users type it: the launcher adds
    --local_rank=N, which llmforge.train accepts; losses equal the native engine's."""
    out, _ = ds_launch
    run, port = tmp_path / "plain", free_port()
    # DeepSpeed's CPU allreduce buffers are named after the port and never unlinked by DeepSpeed: a dead run's
    # (here: garbage) must not be mapped, and this run must leave none behind
    shm = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)]
    for f in shm:
        with open(f, "wb") as fh:
            fh.write(b"\xff" * 64)
    r = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "llmforge.train", TINY,
                 f"data.paths=[{synth_data}]", "model.vocab_size=64", "train.steps=4", "data.seq_len=64",
                 "train.micro_batch_size=2", "logging.plot=false", "train.warmup_steps=2", "train.eval_batches=2",
                 "train.schedule=constant", f"run_dir={run}", "engine=deepspeed", "parallel.dp_shard=2",
                 "parallel.zero_stage=2"], timeout=600, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    nat, ds = read_metrics(out / "native"), read_metrics(run)
    assert sorted(ds) == [1, 2, 3, 4]
    assert max(abs(nat[s]["loss"] - ds[s]["loss"]) / nat[s]["loss"] for s in ds) <= 1e-4
    assert [f for f in shm if os.path.exists(f)] == []


@pytest.mark.slow
def test_zero3_run_is_first_class(ds_launch, tmp_path):
    """eval / generate / export_hf work on a DeepSpeed ZeRO-3 run (shards consolidated with zero_to_fp32); the
    export's loss in transformers equals llmforge.eval's on the same validation windows."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F
    from llmforge.data.streams import build_datasets, validation_batches
    from llmforge.inference.eval import run_eval
    from llmforge.export_hf import main as export_main
    from llmforge.inference.generate import main as generate_main
    from llmforge.inference.run_loading import load_run
    out, _ = ds_launch
    run = str(out / "z3")
    ev = run_eval(run)
    assert ev["step"] == 4 and ev["tokens"] > 0
    hf = str(tmp_path / "hf")
    assert export_main([run, hf]) == 0
    model = transformers.LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    cfg = load_run(run).cfg
    _, valid = build_datasets(cfg.data, cfg.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        n_batches = -(-ev["tokens"] // (ev["batch_size"] * cfg.data.seq_len))
        for batch in validation_batches(valid, ev["batch_size"], n_batches):
            logits = model(batch[:, :-1]).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    assert count == ev["tokens"]
    assert abs(total / count - ev["loss"]) / ev["loss"] < 1e-5, (total / count, ev["loss"])
    # a native run starts from the DeepSpeed run's weights (train.init_from=RUN_DIR)
    init = tmp_path / "from_ds"
    r = run_cli([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{cfg.data.paths[0]}]", "model.vocab_size=64",
                 "data.seq_len=64", "train.steps=0", f"train.init_from={run}", f"run_dir={init}", "logging.plot=false"])
    assert r.returncode == 0, r.stderr[-2000:]
    started = load_run(str(init)).model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(started.values(), load_run(run).model.state_dict().values()))
    # the native engine's trained weights and the consolidated DeepSpeed ones start from the same place
    nat, z3 = load_run(str(out / "native")), load_run(run)
    diff = max((a - b).abs().max().item() for a, b in zip(nat.model.state_dict().values(), z3.model.state_dict().values()))
    assert diff < 1e-4, diff


def _single(synth_data, tmp_path, name, *overrides):
    r = run_cli([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
                 "data.seq_len=64", "logging.plot=false", "train.eval_batches=1", f"run_dir={tmp_path}/{name}",
                 *overrides], timeout=300, env={"DS_ACCELERATOR": "cpu"})
    return r, (read_metrics(tmp_path / name) if os.path.isfile(tmp_path / name / "metrics.jsonl") else {})


def test_nan_policy_equals_native(synth_data, tmp_path):
    """lr=1e9: both engines skip the non-finite steps (weights untouched) and stop after max_bad_steps alike."""
    ov = ["train.lr=1e9", "train.warmup_steps=0", "train.schedule=constant", "train.steps=8", "train.max_bad_steps=3"]
    (rn, nat), (rd, ds) = (_single(synth_data, tmp_path, "nat", *ov), _single(synth_data, tmp_path, "ds", *ov,
                                                                                    "engine=deepspeed"))
    assert rn.returncode == rd.returncode == 2
    for r in (rn, rd):
        assert "3 consecutive steps with non-finite loss" in r.stderr.strip().splitlines()[-1]
    assert sorted(nat) == sorted(ds) and any(row["skipped"] for row in nat.values())
    for s in nat:
        assert nat[s]["skipped"] == ds[s]["skipped"], s
        a, b = nat[s]["loss"], ds[s]["loss"]
        assert (a == b) or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4 * abs(a), (s, a, b)


def test_init_from_hf_equals_native(synth_data, tmp_path):
    from llmforge.hf import save_hf
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    torch.manual_seed(99)
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=64,
                     max_seq_len=128)
    model = Transformer(args)
    hf = str(tmp_path / "hf")
    save_hf(args, model.state_dict(), hf)
    ov = [f"train.init_from_hf={hf}", "train.steps=2"]
    (rn, nat), (rd, ds) = _single(synth_data, tmp_path, "nat", *ov), _single(synth_data, tmp_path, "ds", *ov,
                                                                                "engine=deepspeed")
    assert rn.returncode == 0 and rd.returncode == 0, rd.stderr[-2000:]
    for s in (1, 2):
        assert abs(nat[s]["loss"] - ds[s]["loss"]) <= 1e-5 * nat[s]["loss"], s
