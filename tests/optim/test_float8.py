"""Float8 linears (train.float8, torchao) emulated on CPU: which layers convert, the loss tracks bf16, and the
refusals that come before anything runs."""
import os

import pytest
import torch

from tests.conftest import read_metrics

TINY = "configs/train/tiny-cpu.yaml"
F8 = ["train.float8=true", "train.float8_emulate=true"]
pytest.importorskip("torchao.float8")


def _train(run_dir, data, *extra):
    from llmforge.train import main
    return main([TINY, f"data.paths=[{data}]", f"run_dir={run_dir}", "model.vocab_size=64", "data.seq_len=32",
                 "logging.plot=false", "train.eval_batches=1", "train.log_interval=5", *extra])


def test_every_block_linear_converts_and_the_head_does_not():
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    from llmforge.parallel.float8 import apply_float8, converted
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=64))
    names = apply_float8(model, "tensorwise", emulate=True, fsdp=False)
    want = [f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wk", "attention.wv",
                                                           "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                           "feed_forward.w3")]
    assert sorted(names) == sorted(want) == sorted(converted([model]))
    assert type(model.output) is torch.nn.Linear
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in Transformer(model.args).named_parameters()]


def test_a_linear_whose_dims_are_not_multiples_of_16_stays():
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    from llmforge.parallel.float8 import apply_float8
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=168, vocab_size=64))
    names = apply_float8(model, "rowwise", emulate=True, fsdp=False)
    assert sorted(names) == ["layers.0.attention.wk", "layers.0.attention.wo", "layers.0.attention.wq",
                             "layers.0.attention.wv"]  # kv 16 wide still fits; 168 is not a multiple of 16


def test_emulated_float8_tracks_bf16_over_50_steps(synth_data, tmp_path, capsys):
    assert _train(tmp_path / "bf16", synth_data, "train.steps=50", "train.dtype=bf16") == 0
    assert _train(tmp_path / "f8", synth_data, "train.steps=50", "train.dtype=bf16", *F8) == 0
    assert "float8: 14 linears (attention.wk, attention.wo, attention.wq, attention.wv, feed_forward.w1, " \
           "feed_forward.w2, feed_forward.w3)" in capsys.readouterr().out
    a, b = read_metrics(tmp_path / "bf16"), read_metrics(tmp_path / "f8")
    steps = [s for s in a if "loss" in a[s]]
    assert len(steps) == 10
    rel = max(abs(b[s]["loss"] - a[s]["loss"]) / a[s]["loss"] for s in steps)
    assert 0 < rel < 0.02, rel  # float8 rounding shows, and stays small


@pytest.mark.parametrize("extra,key", [
    (["train.float8=true"], "train.float8"),                          # CPU, no emulation
    ([*F8, "parallel.tp=2"], "train.float8"),
    (["train.float8_emulate=true"], "train.float8_emulate"),
    ([*F8, "train.float8_recipe=blockwise"], "train.float8_recipe"),
    ([*F8, "model.dim=36", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=100"], "train.float8"),
])
def test_bad_float8_settings_are_one_line(synth_data, tmp_path, capsys, extra, key):
    assert _train(tmp_path / "bad", synth_data, "train.steps=2", *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {key}"), err
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")


def test_mfu_peak_blends_bf16_and_float8_by_the_converted_flops():
    """MFU with train.float8 measures against the peak the step could reach: the converted linears' FLOPs at the
    float8 peak, the rest at bf16's (harmonic blend); the converted FLOPs are 6 x their weights."""
    from llmforge.core.config import RunConfig, load_config
    from llmforge.model.presets import model_args
    from llmforge.parallel.float8 import float8_flops_per_token
    from llmforge.train.metrics import PEAK_BF16_TFLOPS, PEAK_FP8_TFLOPS, blended_peak
    assert PEAK_FP8_TFLOPS["H100"] == 2 * PEAK_BF16_TFLOPS["H100"] and "A100" not in PEAK_FP8_TFLOPS
    assert blended_peak(1.0, 2.0, 0.0) == 1.0 and blended_peak(1.0, 2.0, 1.0) == 2.0
    assert blended_peak(1.0, 2.0, 0.5) == pytest.approx(4 / 3)
    assert blended_peak(1.0, None, 0.5) is None and blended_peak(None, 2.0, 0.5) is None
    cfg = load_config(RunConfig, TINY, [*F8])
    margs = model_args(cfg.model, 64)  # tiny: dim 64, 2 layers, kv 2 x 16, ffn 176
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176
    assert float8_flops_per_token(cfg, margs) == 6 * 2 * per_layer
    lora = load_config(RunConfig, TINY, [*F8, "train.lora.rank=4", "train.lora.targets=[wq,wv]"])
    assert float8_flops_per_token(lora, margs) == 6 * 2 * (per_layer - 64 * 64 - 64 * 32)
    assert float8_flops_per_token(load_config(RunConfig, TINY, []), margs) == 0.0
