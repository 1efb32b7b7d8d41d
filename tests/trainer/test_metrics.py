"""MFU arithmetic, the device peak table, and the loss/LR plot."""
import json

import pytest
import torch

from llmforge.train.metrics import PEAK_BF16_TFLOPS, device_peak_flops, mfu, plot_run, truncate_metrics


def test_mfu_formula_and_impossible_values_raise():
    assert device_peak_flops(torch.device("cpu")) is None and mfu(1e6, 1e9, None) is None
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12)
    with pytest.raises(RuntimeError, match="MFU .* > 100%"):
        mfu(2e5, 6e9, 989e12)
    assert PEAK_BF16_TFLOPS["H100 SXM"] == 989.0 and PEAK_BF16_TFLOPS["A100"] == 312.0


def test_truncate_and_plot(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s * 0.1, "lr": 1e-3} for s in range(1, 11)] + [{"step": 10, "val_loss": 4.2}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')  # a line torn by a kill
    truncate_metrics(str(path), 6)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6]
    png = plot_run(str(tmp_path))
    assert png and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
