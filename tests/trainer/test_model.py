"""Model: published parameter counts on the meta device, presets load, FLOPs formula, GQA/family details."""
import dataclasses
import glob

import pytest
import torch

from llmforge.core.config import RunConfig, load_config
from llmforge.model.blocks import apply_rope, rope_tables
from llmforge.model.presets import PRESETS, model_args
from llmforge.model.transformer import Transformer, flops_per_token, num_params

PUBLISHED = {"gpt2-124m": 124_439_808, "llama-1b": 1_235_814_400, "llama-8b": 8_030_261_248,
             "llama-70b": 70_553_706_496}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_parameter_counts(preset):
    with torch.device("meta"):
        model = Transformer(PRESETS[preset])
    assert num_params(model) == PUBLISHED[preset]


@pytest.mark.parametrize("path", sorted(glob.glob("configs/train/*.yaml")))
def test_train_presets_load(path):
    cfg = load_config(RunConfig, path)
    args = model_args(cfg.model, vocab_size=1000)
    assert args.dim % args.n_heads == 0 and cfg.data.seq_len <= args.max_seq_len


def test_flops_per_token_matches_hand_count():
    a = dataclasses.replace(PRESETS["tiny"], vocab_size=100, tie_embeddings=False)
    m = Transformer(a)
    n = num_params(m)
    embed = 100 * 64
    # per layer: q 64*64, k/v 64*32 each (2 kv heads of 16), o 64*64, mlp 3*64*176, two norms of 64
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176 + 2 * 64
    assert n == embed + 2 * per_layer + 64 + 100 * 64
    assert flops_per_token(m, 128) == 6 * (n - embed) + 12 * 2 * 64 * 128
    tied = Transformer(dataclasses.replace(a, tie_embeddings=True))  # the output matmul still counts
    assert flops_per_token(tied, 128) == flops_per_token(m, 128)


def test_model_package_has_no_parallel_code():
    for f in glob.glob("llmforge/model/*.py"):
        text = open(f).read()
        assert "llmforge.parallel" not in text and "torch.distributed" not in text, f


def test_rope_is_a_rotation_and_relative():
    cos, sin = rope_tables(16, 32, 10000.0)
    q, k = torch.randn(1, 32, 1, 16), torch.randn(1, 32, 1, 16)
    qr = apply_rope(q, cos, sin)
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # <R_m q, R_n k> depends only on m - n: shift both by 5 positions
    q0 = q[:, :1].expand(1, 32, 1, 16)
    k0 = k[:, :1].expand(1, 32, 1, 16)
    a, b = apply_rope(q0, cos, sin), apply_rope(k0, cos, sin)
    assert torch.allclose((a[0, 3] * b[0, 1]).sum(), (a[0, 8] * b[0, 6]).sum(), atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_causality(preset):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(PRESETS[preset], vocab_size=50))
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 50
    assert torch.allclose(m(x)[:, :12], m(y)[:, :12], atol=1e-6)
    assert not torch.allclose(m(x)[:, 12:], m(y)[:, 12:])


def test_gqa_equals_repeated_kv_heads():
    """With n_kv_heads < n_heads, attention equals full MHA whose k/v weights repeat each kv head."""
    torch.manual_seed(0)
    g = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=50, n_kv_heads=2))
    full = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=50, n_kv_heads=4))
    sd = g.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(sd)
    x = torch.randint(0, 50, (2, 10))
    assert torch.allclose(g(x), full(x), atol=1e-5)
