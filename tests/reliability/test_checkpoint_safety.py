"""Checkpoint loading and saving that never runs foreign code, never leaves a half save behind and always fails in
one line: crafted DCP ``.metadata`` (issue 12 item 13), a full disk during a save, a garbled RNG file, a missing
``--checkpoint`` path."""
from __future__ import annotations

import builtins
import errno
import glob
import json
import os
import pickle
import shutil
import sys

import pytest

from tests.conftest import ROOT, run_cli, write_synthetic_shards

TINY = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run dir as training leaves it (config.yaml, checkpoints/step_00000002), written in this process: the
    tiny model after one optimizer step, saved by the trainer's Checkpointer (world-1 gloo group)."""
    import torch
    from llmforge.checkpoint.checkpointer import Checkpointer
    from llmforge.core.config import RunConfig, dump_config, load_config
    from llmforge.model.presets import model_args
    from llmforge.model.transformer import Transformer
    from llmforge.inference.run_loading import ensure_process_group
    root = tmp_path_factory.mktemp("ckpt-safety")
    synth = write_synthetic_shards(str(root / "synth"), n_train=40, n_valid=6)
    run = str(root / "run")
    cfg = load_config(RunConfig, TINY, [f"data.paths=[{synth}]", f"run_dir={run}", "model.vocab_size=64",
                                        "train.steps=2", "data.seq_len=64"])
    dump_config(cfg, os.path.join(run, "config.yaml"))
    torch.manual_seed(0)
    model = Transformer(model_args(cfg.model, None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 17))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    ensure_process_group()
    Checkpointer(os.path.join(run, "checkpoints")).save(2, [model], [opt], {"step": 2, "samples": 16})
    return {"run": run, "synth": synth}


def _newest(run_dir: str) -> str:
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))[-1]


class _Payload:
    """Pickles as ``fn(arg)``: what a crafted checkpoint would run on load."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(mark: str):
    return {"exec": _Payload(builtins.exec, f"open({mark!r}, 'w').close()"),
            "os.system": _Payload(os.system, f"touch {mark}")}


def _craft(run_dir: str, payload) -> str:
    """Replace the newest checkpoint's .metadata by ``payload`` and re-vouch for it in COMPLETE (as an attacker
    would), so only the unpickler stands between the file and the code."""
    ckpt = _newest(run_dir)
    meta = os.path.join(ckpt, ".metadata")
    with open(meta, "wb") as f:
        pickle.dump(payload, f)
    marker = os.path.join(ckpt, "COMPLETE")
    sizes = json.load(open(marker))["sizes"]
    sizes[".metadata"] = os.path.getsize(meta)
    json.dump({"sizes": sizes}, open(marker, "w"))
    return meta


def test_real_metadata_passes_the_allow_list(trained):
    from torch.distributed.checkpoint.metadata import Metadata
    from llmforge.core.safe_pickle import load_metadata
    md = load_metadata(os.path.join(_newest(trained["run"]), ".metadata"))
    assert isinstance(md, Metadata) and any(k.startswith("model.") for k in md.state_dict_metadata)


@pytest.mark.parametrize("kind", ["exec", "os.system"])
def test_crafted_metadata_is_refused_in_process(tmp_path, kind):
    from llmforge.core.safe_pickle import UnsafePickleError, load_metadata
    mark = str(tmp_path / "pwned")
    path = str(tmp_path / ".metadata")
    with open(path, "wb") as f:
        pickle.dump(_payloads(mark)[kind], f)
    with pytest.raises(UnsafePickleError) as e:
        load_metadata(path)
    assert path in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(mark)


@pytest.mark.slow
def test_eval_refuses_a_crafted_checkpoint(trained, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    mark = str(tmp_path / "pwned")
    meta = _craft(run, _payloads(mark)["exec"])
    p = run_cli([sys.executable, "-m", "llmforge.eval", run], timeout=240)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and meta in errors[0] and "builtins.exec" in errors[0], p.stderr[-2000:]
    assert not os.path.exists(mark), "the crafted .metadata ran code on llmforge.eval"


@pytest.fixture
def loaded(trained, tmp_path):
    """A copy of the trained run and its model loaded in this process (world-1 gloo group)."""
    from llmforge.inference.run_loading import load_run
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    return run, load_run(run).model


def test_resume_load_refuses_a_crafted_checkpoint(loaded, tmp_path):
    """The trainer's resume path (Checkpointer.load with the optimizer) never unpickles the crafted file."""
    import torch
    from llmforge.checkpoint.checkpointer import Checkpointer
    from llmforge.core.safe_pickle import UnsafePickleError
    run, model = loaded
    mark = str(tmp_path / "pwned")
    _craft(run, _payloads(mark)["os.system"])
    with pytest.raises(UnsafePickleError):
        Checkpointer(os.path.join(run, "checkpoints")).load(_newest(run), [model],
                                                            [torch.optim.AdamW(model.parameters())])
    assert not os.path.exists(mark)


def test_garbled_rng_file_is_one_line_without_weights_only_advice(loaded):
    from llmforge.checkpoint.checkpointer import CheckpointError, Checkpointer
    run, model = loaded
    ckpt = _newest(run)
    rng = os.path.join(ckpt, "rng-rank0.pt")
    with open(rng, "r+b") as f:
        f.write(b"\x00garbage" * 8)
    marker = os.path.join(ckpt, "COMPLETE")  # a sizes-only marker (as older versions wrote): the content hash
    json.dump({"sizes": json.load(open(marker))["sizes"]}, open(marker, "w"))  # must not be what refuses it here
    with pytest.raises(CheckpointError) as e:
        Checkpointer(os.path.join(run, "checkpoints")).load(ckpt, [model], [], load_optimizer=False)
    msg = str(e.value)
    assert rng in msg and "\n" not in msg and "weights_only" not in msg.lower()
    assert "content differs" not in msg, msg


def test_missing_checkpoint_path_says_not_found(loaded):
    from llmforge.inference.run_loading import RunLoadError, load_run
    run, _ = loaded
    missing = os.path.join(run, "checkpoints", "step_99999999")
    with pytest.raises(RunLoadError) as e:
        load_run(run, checkpoint=missing)
    assert "not found" in str(e.value) and missing in str(e.value) and "\n" not in str(e.value)


def test_disk_full_during_save_is_one_line_and_leaves_no_temp(loaded, monkeypatch):
    import torch
    import torch.distributed.checkpoint.filesystem as fs
    from llmforge.checkpoint.checkpointer import CheckpointError, Checkpointer, list_checkpoints
    run, model = loaded
    root = os.path.join(run, "checkpoints")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(root, keep=5)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(fs, "_write_item", full)  # the write of a tensor inside DCP: where a real full disk fails
        with pytest.raises(CheckpointError) as e:
            ck.save(5, [model], [opt], {"step": 5, "samples": 40})
    msg = str(e.value)
    assert "disk full" in msg and "step_00000005" in msg and "\n" not in msg
    assert not glob.glob(os.path.join(root, ".step_*")), "a half-written save was left behind"
    assert [s for s, _ in list_checkpoints(root)] == [2]
    ck.save(5, [model], [opt], {"step": 5, "samples": 40})  # space freed: the next save works
    assert [s for s, _ in list_checkpoints(root)] == [5, 2]


def test_a_real_full_disk_during_save_is_one_line(loaded, tmp_path):
    """A small tmpfs (when this test may mount one) runs full for real: torch's writer then raises a RuntimeError,
    not an OSError, and the save must still say "disk full" and leave nothing behind."""
    import shutil as sh
    import subprocess

    import torch
    from llmforge.checkpoint.checkpointer import CheckpointError, Checkpointer
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or not sh.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        _, model = loaded
        root = str(mnt / "checkpoints")
        with pytest.raises(CheckpointError, match="disk full"):
            Checkpointer(root).save(3, [model], [torch.optim.AdamW(model.parameters())], {"step": 3, "samples": 0})
        assert os.listdir(root) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
