"""Steps that are not logged never wait for the host (no .item()/float() from the loop) when the optimizer can skip
on the device (fused AdamW), and the non-finite guard stays exact: the same weights as a run that syncs every step,
and the run still stops after train.max_bad_steps consecutive skips."""
import os

import pytest
import torch

from tests.conftest import read_metrics

TINY = "configs/train/tiny-cpu.yaml"


def _run(run_dir, data, monkeypatch, fault, *extra):
    from llmforge.train import main
    calls = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted(fn):
        def wrapper(self, *a):
            frame = __import__("sys")._getframe(1)
            if frame.f_code.co_filename.endswith(os.path.join("llmforge", "train", "trainer.py")):
                calls.append(frame.f_code.co_name)
            return fn(self, *a)
        return wrapper
    monkeypatch.setenv("LLMFORGE_FAULT", fault)
    monkeypatch.setattr(torch.Tensor, "item", counted(item))
    monkeypatch.setattr(torch.Tensor, "__float__", counted(to_float))
    rc = main([TINY, f"data.paths=[{data}]", f"run_dir={run_dir}", "model.vocab_size=64", "train.steps=8",
               "data.seq_len=32", "logging.plot=false", "train.eval_batches=1", "train.fused_optimizer=true",
               "train.warmup_steps=0", *extra])
    monkeypatch.undo()
    return rc, calls


def test_unlogged_steps_do_not_sync_and_skips_stay_exact(synth_data, tmp_path, monkeypatch):
    rc, every = _run(tmp_path / "every", synth_data, monkeypatch, "nan@3", "train.log_interval=1")
    assert rc == 0
    rc, sparse = _run(tmp_path / "sparse", synth_data, monkeypatch, "nan@3", "train.log_interval=4")
    assert rc == 0
    a, b = read_metrics(tmp_path / "every"), read_metrics(tmp_path / "sparse")
    assert a[3]["skipped"] and sorted(b) == [4, 8]
    for s in (4, 8):  # the skip of step 3 happened on the device: identical training afterwards
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"]
    per_step = [c for c in every if c == "train_step"]
    assert len([c for c in sparse if c == "train_step"]) * 4 == len(per_step)  # host reads on logged steps only
    assert len(per_step) >= 8


def test_a_run_of_skips_between_logs_still_stops(synth_data, tmp_path, monkeypatch):
    from llmforge.train.engines.base import TrainingError
    with pytest.raises(TrainingError, match="3 consecutive steps with non-finite loss"):
        import os as _os
        _os.environ["LLMFORGE_DEBUG"] = "1"
        try:
            _run(tmp_path / "r", synth_data, monkeypatch, "nan@5,6,7", "train.log_interval=4", "train.max_bad_steps=3")
        finally:
            del _os.environ["LLMFORGE_DEBUG"]
    rows = read_metrics(tmp_path / "r")
    assert sorted(rows) == [4]  # stopped at the logged step 8, before writing its row
