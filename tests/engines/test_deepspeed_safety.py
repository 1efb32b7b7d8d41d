"""engine: deepspeed keeps the native engine's contracts (issue 21 items 8 and 9).

Item 8: raw ``deepspeed.optimizer`` / ``deepspeed.scheduler`` sections were recorded in deepspeed_config.json and
then overridden by train.lr and our schedule; they are refused in one line naming the key and the train.* keys to
use, before any collective. Item 9: ZeRO-2 dp2 with train.lr=1e9 left the loss finite (uniform, ln 64) with an
infinite gradient norm, and no step counted as skipped; now the non-finite policy sees DeepSpeed's global norm
and skips / stops exactly as the native engine does on the same config, under ZeRO-2 and under PP.
"""
import json
import math
import os
import sys

import pytest

from launch.torchrun import free_port
from tests.conftest import ROOT, read_metrics, run_cli

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")

TINY = os.path.join(ROOT, "configs/train/tiny-cpu.yaml")


@pytest.mark.parametrize("key, section, hint", [
    ("deepspeed.optimizer.params.lr=0.5", "deepspeed.optimizer", "set train.lr, train.weight_decay"),
    ("deepspeed.scheduler.type=WarmupLR", "deepspeed.scheduler", "set train.lr, train.schedule, train.warmup_steps"),
])
def test_raw_optimizer_and_scheduler_refused_before_any_collective(synth_data, tmp_path, key, section, hint):
    """RANK=0 of a claimed world of 2 with no rank 1: reaching the process group would hang (timeout)."""
    run = tmp_path / "r"
    env = {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    r = run_cli([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64",
                 f"run_dir={run}", "engine=deepspeed", key], timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {section}: not supported by engine=deepspeed"), lines
    assert hint in lines[0]
    assert not run.exists()  # nothing written


def test_compute_grad_norm_false_refused():
    from llmforge.core.config import ConfigError, RunConfig, load_config
    from llmforge.train.engines.deepspeed import DeepSpeedEngine
    cfg = load_config(RunConfig, TINY, ["engine=deepspeed", "deepspeed.zero_optimization.compute_grad_norm=false"])
    with pytest.raises(ConfigError, match="compute_grad_norm=false: the non-finite step policy"):
        DeepSpeedEngine.check_config(cfg)


RUNS = {  # the repro (ZeRO-2 dp2, lr 1e9, default warmup) and PP, each next to the native engine
    "native_z2": ["parallel.zero_stage=2", "parallel.dp_shard=2"],
    "ds_z2": ["engine=deepspeed", "parallel.zero_stage=2"],
    "ds_z1": ["engine=deepspeed", "parallel.zero_stage=1"], "ds_z3": ["engine=deepspeed", "parallel.zero_stage=3"],
    "native_pp": ["parallel.pp=2", "model.tie_embeddings=false"],
    "ds_pp": ["engine=deepspeed", "parallel.pp=2", "model.tie_embeddings=false"],
    "ds_pp_z1": ["engine=deepspeed", "parallel.pp=2", "parallel.zero_stage=1", "model.tie_embeddings=false"],
}


@pytest.fixture(scope="module")
def lr1e9(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lr1e9")
    common = [f"data.paths=[{synth_data}]", "model.vocab_size=64", "train.steps=6", "train.lr=1e9",
              "train.max_bad_steps=3", "data.seq_len=64", "logging.plot=false", "train.eval_batches=1"]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"config": "configs/train/tiny-cpu.yaml", "common": common, "keep_going": True,
                                "runs": [[f"run_dir={out / name}", *ov] for name, ov in RUNS.items()]}))
    r = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "tests/engines/ds_runs.py", str(spec)], timeout=600,
                env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    errors = {}
    for line in r.stderr.splitlines():
        if line.startswith("RUN_ERROR "):
            run_dir, msg = line[len("RUN_ERROR "):].split(": ", 1)
            errors.setdefault(os.path.basename(run_dir), set()).add(msg)
    return out, errors, r


@pytest.mark.slow
@pytest.mark.parametrize("native, ds", [("native_z2", "ds_z2"), ("native_z2", "ds_z1"), ("native_z2", "ds_z3"),
                                        ("native_pp", "ds_pp"), ("native_pp", "ds_pp_z1")])
def test_infinite_gradients_skip_and_stop_like_native(lr1e9, native, ds):
    out, errors, r = lr1e9
    nat, dsm = read_metrics(out / native), read_metrics(out / ds)
    # both stop after train.max_bad_steps=3 skipped steps in a row, with the same one line (each rank says it)
    assert set(errors) >= {native, ds}, r.stderr[-3000:]
    assert errors[native] == errors[ds] and len(errors[ds]) == 1, errors
    assert "3 consecutive steps with non-finite loss" in next(iter(errors[ds]))
    assert sorted(nat) == sorted(dsm) == [1, 2, 3], (sorted(nat), sorted(dsm))  # step 4 stops before its row
    assert [nat[s]["skipped"] for s in nat] == [dsm[s]["skipped"] for s in nat] == [False, True, True]
    for s in nat:  # the skipped updates never reached the weights: the loss is the same, finite or not
        a, b = nat[s]["loss"], dsm[s]["loss"]
        assert (a != a and b != b) or abs(a - b) <= 1e-4 * abs(a), (s, a, b)
        assert isinstance(nat[s]["grad_norm"], float) and isinstance(dsm[s]["grad_norm"], float)  # never None
    assert all(not math.isfinite(dsm[s]["grad_norm"]) for s in (2, 3)), dsm
    if not ds.startswith("ds_pp"):  # the case: a finite (uniform) loss, so only the norm can tell
        assert all(math.isfinite(dsm[s]["loss"]) for s in (2, 3)), dsm


@pytest.mark.slow
def test_dp2_resume_refuses_a_planted_shard_of_rank_1_on_every_rank(synth_data, tmp_path):
    """Only rank 1 would read the planted ZeRO shard: rank 0 scans the whole tag first, so both ranks refuse
    together (no hang in a collective), one line is printed, nothing is removed and nothing runs."""
    import torch
    from tests.reliability.test_unpickle import _Payload
    run, marker = tmp_path / "run", tmp_path / "pwned"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmforge.train",
           TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64", "data.seq_len=32", "train.global_batch_size=4",
           "logging.plot=false", "train.eval_batches=1", "engine=deepspeed", "parallel.zero_stage=2", f"run_dir={run}"]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    assert run_cli(cmd + ["train.steps=1"], timeout=300, env=env).returncode == 0
    tag = run / "checkpoints" / "step_00000001"
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(shard, map_location="cpu", weights_only=False)  # our own file: safe to load unrestricted
    state["evil"] = _Payload(str(marker))
    torch.save(state, shard)
    before = sorted(os.listdir(tag))
    r = run_cli(cmd + ["train.steps=2"], timeout=300, env=env)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert str(shard) in errors[0] and "posix.system" in errors[0], errors
    assert not marker.exists() and sorted(os.listdir(tag)) == before


def test_raw_gradient_clipping_conflicting_with_train_grad_clip_refused():
    """deepspeed.gradient_clipping is train.grad_clip under another name: a different value would win silently."""
    from llmforge.core.config import ConfigError, RunConfig, load_config
    from llmforge.train.engines.deepspeed import DeepSpeedEngine
    cfg = load_config(RunConfig, TINY, ["engine=deepspeed", "train.grad_clip=1.0", "deepspeed.gradient_clipping=0.5"])
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 conflicts with train.grad_clip=1.0"):
        DeepSpeedEngine.check_config(cfg)
    same = load_config(RunConfig, TINY, ["engine=deepspeed", "train.grad_clip=0.5", "deepspeed.gradient_clipping=0.5"])
    DeepSpeedEngine.check_config(same)
