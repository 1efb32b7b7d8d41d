"""Planner: Llama-shape rounding (exact counts), the memory model, layouts, the written config, bad budgets."""
import json
import sys

import pytest
import torch

from llmforge.core.config import RunConfig, load_config
from llmforge.model.blocks import ModelArgs
from llmforge.model.transformer import Transformer, flops_per_token, num_params
from llmforge.scaling.law import BESIROGLU_2024, ScalingError
from llmforge.scaling.memory import GPUS, Layout, choose_layout, rank_memory, usable_bytes
from llmforge.scaling.plan import make_plan, min_budget
from llmforge.scaling.shapes import Shape, round_to_shape, smallest
from tests.conftest import run_cli


@pytest.mark.parametrize("target,vocab", [(6e5, 4096), (3e6, 4096), (1.3e8, 32000), (1.2e9, 128256)])
def test_shape_count_equals_the_real_model(target, vocab):
    shape = round_to_shape(target, vocab)
    assert abs(shape.params() / target - 1) < 0.06
    args = ModelArgs(family="llama", max_seq_len=256, **{k: v for k, v in shape.model_overrides().items()
                                                          if k != "family"})
    with torch.device("meta"):
        model = Transformer(args)
    assert shape.params() == num_params(model)
    assert shape.non_embedding_params() == num_params(model, exclude_embeddings=True) - shape.vocab_size * shape.dim
    assert shape.flops_per_token(256) == flops_per_token(model, 256)
    assert shape.n_heads % shape.n_kv_heads == 0 and shape.dim % shape.n_heads == 0


def test_published_shapes_count_exactly():
    assert Shape(4096, 32, 32, 8, 14336, 128256).params() == 8_030_261_248      # Llama 3.1 8B
    assert Shape(8192, 80, 64, 8, 28672, 128256).params() == 70_553_706_496     # Llama 3.1 70B


def test_memory_model_terms():
    shape = Shape(4096, 32, 32, 8, 14336, 128256)
    p = shape.params()
    ddp = rank_memory(shape, Layout(tp=1, pp=1, dp=1, zero_stage=0, micro_batch=1, recompute="none"), 4096)
    assert ddp["states"] == 16 * p                   # fp32 weights + grads + Adam m, v
    fsdp = rank_memory(shape, Layout(tp=1, pp=1, dp=8, zero_stage=3, micro_batch=1, recompute="none"), 4096)
    assert fsdp["states"] == pytest.approx(16 * p / 8 + 4 * shape.layer_params())
    assert fsdp["activations"] == ddp["activations"]
    tp2 = rank_memory(shape, Layout(tp=2, pp=1, dp=4, zero_stage=3, micro_batch=1, recompute="none"), 4096)
    assert tp2["activations"] == pytest.approx(ddp["activations"] / 2)
    full = rank_memory(shape, Layout(tp=1, pp=1, dp=8, zero_stage=3, micro_batch=1, recompute="full"), 4096)
    assert full["activations"] < fsdp["activations"] / 5


def test_layout_fits_or_says_why():
    shape = Shape(8192, 80, 64, 8, 28672, 128256)   # 70B: 1.1 TB of training state
    mem = GPUS["h100"][0]
    layout, _ = choose_layout(shape, 8, mem, 4096)
    assert layout is None                            # 1.1 TB / 8 > 80 GB
    layout, m = choose_layout(shape, 64, mem, 4096)
    assert layout is not None and layout.world == 64 and m["total"] <= usable_bytes(mem)
    small, m = choose_layout(Shape(768, 12, 12, 3, 2688, 32000), 8, mem, 1024)
    assert (small.tp, small.pp, small.zero_stage, small.recompute) == (1, 1, 1, "none")


def test_chinchilla_budget_plan_is_near_70b_on_1_4t():
    plan = make_plan(BESIROGLU_2024, 5.76e23, vocab=128256, seq_len=4096, gpu="h100", gpus=1024)
    assert 60e9 < plan["params"] < 85e9
    assert 1.1e12 < plan["tokens"] < 1.6e12
    assert plan["flops_6nd"] == pytest.approx(5.76e23, rel=0.02)
    assert plan["predicted_loss"] == pytest.approx(BESIROGLU_2024.loss(plan["params"], plan["tokens"]))
    lay = plan["layout"]
    assert lay["parallel.tp"] * lay["parallel.pp"] * lay["parallel.dp_shard"] * lay["parallel.dp_replicate"] == 1024
    assert plan["global_batch_size"] % (lay["parallel.dp_shard"] * lay["parallel.dp_replicate"]) == 0


def test_budget_below_the_smallest_model_is_refused():
    tiny = smallest(128256)
    with pytest.raises(ScalingError, match="too small.*smallest model"):
        make_plan(BESIROGLU_2024, min_budget(BESIROGLU_2024, tiny) * 0.9, vocab=128256, seq_len=4096)
    plan = make_plan(BESIROGLU_2024, min_budget(BESIROGLU_2024, tiny) * 1.1, vocab=128256, seq_len=128, gpus=1)
    assert plan["params"] == tiny.params()


def test_plan_cli_writes_a_loadable_config_and_the_frontier_plot(tmp_path):
    out = tmp_path / "plan"
    p = run_cli([sys.executable, "-m", "llmforge.scaling", "plan", "--gpu-hours", "20000", "--gpu", "h200",
                 "--gpus", "16", "--mfu", "0.35", "--out-dir", str(out), "data.paths=[/data/web]"])
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("PLAN ")
    plan = json.loads(last[5:])
    assert plan["flops"] == pytest.approx(20000 * 3600 * 989e12 * 0.35)
    assert plan["gpus"] == 16 and plan["wall_hours"] == pytest.approx(plan["gpu_hours"] / 16)
    cfg = load_config(RunConfig, plan["config"])
    m, par = cfg.model, cfg.parallel
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == tuple(
        plan["shape"][k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"))
    assert cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len == plan["tokens"]
    assert par.tp * par.pp * par.dp_shard * max(par.dp_replicate, 1) == 16
    assert cfg.data.paths == ["/data/web"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "plan.json").read_text())["params"] == plan["params"]
    assert not list(out.glob("*.tmp*"))
