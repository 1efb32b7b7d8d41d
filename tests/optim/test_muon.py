"""Muon (train.optimizer=muon): the Newton-Schulz iteration against an SVD, which tensors take Muon, the start-up
line that says so, bitwise resume, and one-line refusals of bad keys."""
import json
import os

import pytest
import torch

from llmforge.core.muon import is_muon_param, muon_names, newton_schulz, update_scale
from tests.conftest import read_metrics

TINY = "configs/train/tiny-cpu.yaml"


@pytest.mark.parametrize("shape", [(64, 176), (176, 64), (48, 48)])
def test_newton_schulz_approximates_the_svd_orthogonalisation(shape):
    """The quintic with (3.4445, -4.7750, 2.0315) does not converge to U V^T: after 5 steps the singular values
    lie in about [0.6, 1.15] (Keller Jordan's documented behaviour; the tolerance here is [0.5, 1.5]) and the
    result points the way of U V^T (cosine > 0.97); the SVD's U V^T itself is a fixed point up to that band."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    ref = u @ vh
    o = newton_schulz(g)
    sv = torch.linalg.svdvals(o)
    assert 0.5 < float(sv.min()) and float(sv.max()) < 1.5
    assert float((o * ref).sum() / (o.norm() * ref.norm())) > 0.97
    assert o.shape == g.shape
    assert torch.allclose(newton_schulz(3.7 * g), o, atol=1e-5)  # scale-free (Frobenius normalisation)
    sv_fixed = torch.linalg.svdvals(newton_schulz(ref))
    assert 0.5 < float(sv_fixed.min()) and float(sv_fixed.max()) < 1.5


def test_update_scale_rules():
    assert update_scale((64, 256), "rms", 0.2) == pytest.approx(0.2 * 16)
    assert update_scale((256, 64), "spectral", 0.2) == pytest.approx(2.0)
    assert update_scale((64, 256), "spectral", 0.2) == 1.0
    assert update_scale((64, 256), "none", 0.2) == 1.0


def test_which_tensors_take_muon():
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.lora import add_adapters
    from llmforge.model.transformer import Transformer
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50))
    add_adapters(model, 2, 4.0, ["wq"])
    for p in model.parameters():
        p.requires_grad_(True)
    muon, adamw = muon_names([model])
    want = {f"layers.{i}.{m}.weight" for i in range(2) for m in ("attention.wq", "attention.wk", "attention.wv",
                                                                   "attention.wo", "feed_forward.w1",
                                                                   "feed_forward.w2", "feed_forward.w3")}
    assert set(muon) == want
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention_norm.weight",
            "layers.0.attention.wq.lora_a", "layers.1.attention.wq.lora_b"} <= set(adamw)
    assert not is_muon_param("layers.0.attention_norm.weight", torch.zeros(4))


def _train(run_dir, data, *extra):
    from llmforge.train import main
    return main([TINY, f"data.paths=[{data}]", f"run_dir={run_dir}", "model.vocab_size=64", "data.seq_len=32",
                 "logging.plot=false", "train.eval_batches=1", "train.optimizer=muon", *extra])


def test_muon_trains_prints_its_split_and_resumes_bitwise(synth_data, tmp_path, capsys):
    assert _train(tmp_path / "full", synth_data, "train.steps=6") == 0
    out = capsys.readouterr().out
    assert "muon: 14 matrices (attention.wk, attention.wo, attention.wq, attention.wv, feed_forward.w1, " \
           "feed_forward.w2, feed_forward.w3); adamw: 7 tensors" in out
    assert _train(tmp_path / "split", synth_data, "train.steps=3") == 0
    assert _train(tmp_path / "split", synth_data, "train.steps=6") == 0
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    for s in range(1, 7):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"], s


def test_rms_rule_gives_matrix_updates_of_rms_0_2_lr_like_adamw():
    """Moonlight's rule: the orthogonalised update scaled by 0.2 sqrt(max(rows, cols)) has RMS ~0.2 (singular
    values near 1), so lr * 0.2 per step whatever the shape; AdamW's groups step as torch's AdamW does."""
    from llmforge.core.muon import Muon
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(64, 176, generator=g).requires_grad_(), torch.randn(176, generator=g).requires_grad_()
    ref_b = b.detach().clone().requires_grad_()
    opt = Muon([{"params": [w], "use_muon": True}, {"params": [b], "weight_decay": 0.1}], lr=1e-2)
    ref = torch.optim.AdamW([ref_b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        w.grad, b.grad = torch.randn(64, 176, generator=g), torch.randn(176, generator=g)
        ref_b.grad = b.grad.clone()
        before = w.detach().clone()
        opt.step()
        ref.step()
        rms = float((w.detach() - before).pow(2).mean().sqrt())
        assert 0.7 * 0.2e-2 < rms < 1.2 * 0.2e-2, rms
    assert torch.allclose(b, ref_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("extra,key", [
    (["train.optimizer=sgd"], "train.optimizer"),
    (["train.optimizer=adamw", "train.muon.momentum=0.9"], "train.muon.momentum"),
    (["train.muon.update_scale=huge"], "train.muon.update_scale"),
    (["parallel.zero_stage=1"], "train.optimizer"),
    (["engine=deepspeed"], "train.optimizer"),
])
def test_bad_muon_keys_are_one_line_before_anything_runs(synth_data, tmp_path, capsys, extra, key):
    assert _train(tmp_path / "bad", synth_data, "train.steps=2", *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")


def test_muon_checkpoint_holds_momentum_for_matrices_and_adam_moments_for_the_rest(synth_data, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    assert _train(tmp_path / "r", synth_data, "train.steps=2") == 0
    ckpt = next((tmp_path / "r" / "checkpoints").glob("step_*"))
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    momentum = {k for k in keys if k.endswith("momentum_buffer")}
    moments = {k for k in keys if k.endswith("exp_avg_sq")}
    assert len(momentum) == 14 and all("layers." in k for k in momentum), sorted(momentum)
    assert len(moments) == 7 and not any(k.endswith(("wq.weight.exp_avg_sq", "w2.weight.exp_avg_sq")) for k in moments)
