"""``python -m llmforge.dryrun``: its per-rank memory model equals what real CPU ranks hold, it handles hundreds of
ranks in one process, and its command line honours the DRYRUN contract."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tests.parallel.conftest import CONFIG, run_fn

SMALL = ["model.vocab_size=64", "data.seq_len=64", "train.global_batch_size=4", "train.dtype=fp32"]
LAYOUTS = {
    "zero3_dp2": ["parallel.dp_shard=2", "parallel.zero_stage=3"],
    "zero1_dp2": ["parallel.dp_replicate=2", "parallel.zero_stage=1"],
    "tp2_vocab65": ["parallel.tp=2", "model.vocab_size=65"],
    "pp2": ["parallel.pp=2"],
    "moe_ep2": ["model.preset=tiny-moe", "parallel.dp_shard=2", "parallel.zero_stage=3", "parallel.ep=2"],
    "cp2_zero3": ["parallel.cp=2", "parallel.zero_stage=3"],  # FSDP over dp_shard x cp: weights halved
}


def _plan(overrides, world):
    from llmforge.core.config import RunConfig, load_config
    from llmforge.dryrun import _resolve
    cfg = load_config(RunConfig, CONFIG, [*SMALL, *overrides])
    margs, dims, micro, accum = _resolve(cfg, world)
    return cfg, margs, dims, micro, accum


def _real_rank(rank, world, overrides):
    """One real training step on CPU/gloo; the bytes this rank then holds (counted from the tensors)."""
    from llmforge.core.loss import loss_fn
    from llmforge.core.optim import build_optimizer
    from llmforge.parallel import build_mesh
    from llmforge.parallel.build import build_parallel_model
    from llmforge.parallel.data_parallel import local_optimizer
    from llmforge.parallel.memory import local_bytes, measure_activations
    from llmforge.parallel.pipeline import pipeline_forward_backward
    torch.set_num_threads(1)
    cfg, margs, dims, micro, accum = _plan(overrides, world)
    mesh, _ = build_mesh(dims, "cpu")
    pm = build_parallel_model(margs, dims, mesh, cfg, torch.device("cpu"), loss_fn)
    opts = pm.zero1_optimizers or [build_optimizer([p], cfg.train, torch.device("cpu")) for p in pm.parts]
    batch = torch.randint(0, margs.vocab_size, (cfg.train.global_batch_size // dims.dp, cfg.data.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]
    act, pos = None, None
    if pm.context is not None:  # context parallelism: this rank's chunks of each sequence
        x, y, pos = pm.context.shard_batch(x, y)
    if pm.schedule is not None:
        pipeline_forward_backward(pm, x, y, contextlib.nullcontext)
    elif cfg.parallel.zero_stage in (2, 3):  # FSDP's gathered weights would count as saved tensors here
        loss_fn(pm.parts[0](x, positions=pos), y).backward()
    else:
        act = measure_activations([getattr(pm.parts[0], "module", pm.parts[0])], [True], [True], micro, cfg.data.seq_len, torch.float32, loss_fn,
                                  flash=False)[0]
        loss_fn(pm.parts[0](x), y).backward()
    for opt in opts:
        opt.step()
    params = [p for part in pm.parts for p in part.parameters()]
    state = [v for o in opts for s in local_optimizer(o).state.values() for k, v in s.items() if k != "step"]
    return {"params": sum(local_bytes(p) for p in params), "grads": sum(local_bytes(p.grad) for p in params),
            "optim": sum(local_bytes(v) for v in state), "activations": act}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_model_equals_real_cpu_ranks(tmp_path, name):
    """Parameter, gradient and AdamW-state bytes per rank: the dry run (meta tensors, fake process group) equals
    real gloo ranks after a training step exactly; activations of one micro batch within 10% (the dry run
    counts attention as GPU flash kernels save it; the CPU kernel differs slightly)."""
    from llmforge.dryrun import _in_child, _simulate_fake
    real = run_fn(2, _real_rank, LAYOUTS[name], tmp=str(tmp_path))
    cfg, margs, dims, micro, accum = _plan(LAYOUTS[name], 2)
    for rank, r in enumerate(real):
        dry = _in_child(_simulate_fake, cfg, margs, dims, rank, micro, accum)
        print(f"{name} rank {rank}: real {r} | dry params {dry.param_bytes} grads {dry.grad_bytes} "
              f"optim {dry.optim_bytes} activations {dry.activation_bytes}")
        assert (dry.param_bytes, dry.grad_bytes, dry.optim_bytes) == (r["params"], r["grads"], r["optim"])
        if r["activations"] is not None:
            real_act = r["activations"]["other"] + sum(r["activations"]["blocks"].values())
            assert abs(dry.activation_bytes - real_act) <= 0.10 * real_act


def test_dryrun_512_ranks_small_model(capsys):
    """512 ranks (pp2 x dp_shard128 x tp2) in one process: totals add up, one row per pipeline stage."""
    from llmforge.dryrun import main
    rc = main([CONFIG, "--world-size", "512", "model.vocab_size=256", "model.n_layers=4", "parallel.pp=2",
               "parallel.tp=2", "parallel.dp_shard=128", "parallel.zero_stage=3", "train.global_batch_size=256",
               "data.seq_len=64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    from llmforge.model.transformer import num_params
    from llmforge.parallel.build import meta_model
    cfg, margs, *_ = _plan(["model.vocab_size=256", "model.n_layers=4"], 1)
    assert d["params_total"] == num_params(meta_model(margs))
    assert [r["rank"] for r in d["ranks"]] == [0, 256] and d["world_size"] == 512
    assert d["layout"].startswith("pp2 x dp_replicate1 x dp_shard128 x tp2 zero3")
    # every stage's parameters split 256 ways (FSDP over 128 x TP 2), up to uneven dim-0 shards
    assert d["params_per_rank_max"] * 256 >= d["params_total"] / 2


def test_dryrun_llama8b_fsdp8_contract(capsys):
    """Acceptance: llama-8b on 8 ranks (FSDP) reports per-rank parameters = total / 8 up to rounding; a layout
    that does not fit says which rank, which component and by how much."""
    from llmforge.dryrun import main
    rc = main(["configs/train/llama-8b.yaml", "--world-size", "8", "parallel.dp_shard=8", "parallel.zero_stage=3",
               "parallel.dp_replicate=1", "data.seq_len=256", "--gpu", "h100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    assert d["params_total"] == 8_030_261_248
    assert abs(d["params_per_rank_max"] - d["params_total"] / 8) <= 8
    assert d["fits"] is True and "| rank" not in out
    rc = main(["configs/train/llama-8b.yaml", "--world-size", "8", "parallel.dp_shard=1", "parallel.zero_stage=0",
               "parallel.dp_replicate=8", "data.seq_len=256", "--gpu", "h100"])
    out = capsys.readouterr().out
    d = json.loads(out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    assert rc == 0 and d["fits"] is False
    assert "does not fit: rank 0" in d["reason"] and "GiB over" in d["reason"]
    assert d["ranks"][0]["optimizer_bytes"] == 2 * 4 * d["params_total"]  # AdamW moments, fp32, unsharded


def test_dryrun_qwen3_moe_counts_total_and_active_parameters_and_the_all_to_all(capsys):
    """Acceptance: the published Qwen3-30B-A3B size, its active parameters, experts per rank and the
    expert-parallel all-to-all volume (16 micro batches x 48 blocks x 4 exchanges x 4096 x 8 rows of 2048 bf16,
    7/8 of them leaving the rank)."""
    from llmforge.dryrun import main
    rc = main(["configs/train/qwen3-30b-a3b.yaml", "--world-size", "64", "parallel.dp_shard=64", "parallel.ep=8",
               "parallel.tp=1", "parallel.dp_replicate=1", "parallel.zero_stage=3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    assert d["params_total"] == 30_532_122_624 and d["params_active"] == 3_353_032_704
    assert d["experts_per_rank"] == 16 and "(ep8)" in d["layout"]
    assert d["ranks"][0]["comm_bytes_per_step"]["ep"] == 16 * 48 * 4 * 4096 * 8 * 2048 * 2 * 7 // 8


def test_dryrun_bad_layout_is_one_line(capsys):
    from llmforge.dryrun import main
    rc = main(["configs/train/llama-8b.yaml", "--world-size", "6", "parallel.tp=4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "world size 6" in err


def test_dryrun_llama8b_128k_fits_with_cp8_and_not_without(capsys):
    """Acceptance: llama-8b at 131072 tokens on 64 H100s: dp_shard 8 x cp 8 fits; the same layout without cp
    (dp_replicate 8 x dp_shard 8, a whole sequence per rank) does not, and says activations are why. The cp
    volume: 8 micro batches x 32 blocks x (K/V all-gather forward + reduce-scatter backward) of 7/8 of the
    sequence's 131072 x 1024 bf16 K and V."""
    from llmforge.dryrun import main
    rc = main(["configs/train/llama-8b-128k.yaml", "--world-size", "64", "--gpu", "h100"])
    out = capsys.readouterr().out
    d = json.loads(out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    assert rc == 0 and d["fits"] is True and "x cp8 x" in d["layout"], d["reason"]
    assert d["ranks"][0]["comm_bytes_per_step"]["cp"] == 8 * 32 * 2 * (131072 * 7 // 8) * 1024 * 2 * 2
    rc = main(["configs/train/llama-8b-128k.yaml", "--world-size", "64", "--gpu", "h100", "parallel.cp=1"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("DRYRUN "))
    assert rc == 0 and d["fits"] is False and "largest component: activations" in d["reason"]
    assert "parallel.cp" in d["reason"]
