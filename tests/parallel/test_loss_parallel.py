"""GPU throughput features, checked for equality on CPU: the chunked cross-entropy, loss parallel under TP (the
cross-entropy on vocab shards), and grouped-query attention without K/V copies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.parallel.conftest import CONFIG, run_fn
from tests.parallel.test_layouts import assert_matches_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_plain(monkeypatch, dtype):
    import llmforge.core.loss as L
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 7000)  # 7 rows of 1000 per chunk: many chunks, a ragged last one
    logits = (torch.randn(3, 50, 1000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (3, 50), generator=torch.Generator().manual_seed(1))
    targets[0, :5] = L.IGNORE_INDEX
    for reduction in ("mean", "sum"):
        got = L.cross_entropy(logits, targets, reduction=reduction)
        (g_got,) = torch.autograd.grad(got, logits)
        want = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
        (g_want,) = torch.autograd.grad(want, logits)
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
        tol = (1e-6 if dtype == torch.float32 else 1e-2) * g_want.abs().max().item()  # bf16: one rounding
        assert (g_got.float() - g_want.float()).abs().max().item() <= tol
    assert L.cross_entropy(logits, targets, reduction="none").shape == targets.shape


def test_gqa_without_kv_copies_equals_repeat_interleave():
    from llmforge.model.blocks import Attention, ModelArgs
    torch.manual_seed(0)
    attn = Attention(ModelArgs(dim=64, n_heads=8, n_kv_heads=2))
    x = torch.randn(2, 16, 64)
    q, k, v = (w(x).view(2, 16, -1, 8) for w in (attn.wq, attn.wk, attn.wv))
    k, v = k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2)  # the copies the model no longer makes
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    ref = attn.wo(ref.transpose(1, 2).reshape(2, 16, -1))
    assert (attn(x) - ref).abs().max().item() <= 1e-6


def _loss_and_grads(rank, world, overrides):
    from torch.distributed.tensor import DTensor
    from llmforge.core.config import RunConfig, load_config
    from llmforge.core.loss import loss_fn
    from llmforge.model.init import canonical_name
    from llmforge.model.presets import model_args
    from llmforge.parallel import build_mesh, resolve_dims
    from llmforge.parallel.build import build_parallel_model
    torch.set_num_threads(1)
    cfg = load_config(RunConfig, CONFIG, ["model.vocab_size=65", "data.seq_len=32", *overrides])
    margs = model_args(cfg.model)
    dims = resolve_dims(cfg.parallel, world, margs, cfg.train, cfg.recompute, cfg.data.seq_len)
    mesh, _ = build_mesh(dims, "cpu")
    pm = build_parallel_model(margs, dims, mesh, cfg, torch.device("cpu"), loss_fn)
    x = torch.randint(0, 65, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = pm.parts[0](x[:, :-1])
    sharded = isinstance(logits, DTensor) and logits.placements[0].is_shard()
    loss = loss_fn(logits, x[:, 1:])
    loss.backward()
    grads = {canonical_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in pm.parts[0].named_parameters()}
    return loss.item(), grads, sharded, tuple(logits.to_local().shape) if sharded else tuple(logits.shape)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_loss_parallel_equals_one_process(tmp_path, preset):
    """TP2 with the output projection sharded over an odd vocabulary (65): each rank holds B x S x 33 or 32
    logits, and the loss and every gradient equal one process."""
    ((ref_loss, ref_grads, _, _),) = run_fn(1, _loss_and_grads, [f"model.preset={preset}"], tmp=str(tmp_path))
    got = run_fn(2, _loss_and_grads, [f"model.preset={preset}", "parallel.tp=2", "parallel.loss_parallel=true"],
                 tmp=str(tmp_path))
    for rank, (loss, grads, sharded, shape) in enumerate(got):
        assert sharded and shape == (2, 32, 33 - rank)  # never the full 65-wide logits
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss
        for name, g in grads.items():
            assert (g - ref_grads[name]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[name].abs().max().item())


@pytest.mark.parametrize("name,nproc,overrides", [
    ("tp2_loss_parallel", 2, ["parallel.tp=2", "parallel.loss_parallel=true"]),
    ("tp2_gathered_logits", 2, ["parallel.tp=2", "parallel.loss_parallel=false"]),  # the all-gather path
    pytest.param("pp2_tp2_loss_parallel", 4, ["parallel.pp=2", "parallel.tp=2", "parallel.loss_parallel=true"],
                 marks=pytest.mark.slow),
])
def test_loss_parallel_training_matches_single_process(runner, name, nproc, overrides):
    """The real trainer: 6 steps (and validation, on vocab shards) equal one process."""
    ref = runner.reference()
    run_dir = runner.run(name, nproc, overrides)
    assert_matches_reference(run_dir, ref, name, same_eval_windows=True)
