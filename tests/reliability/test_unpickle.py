"""Issue 21 item 1: no llmforge command unpickles a stranger's code. A ``__reduce__`` payload (it would create a
marker file) planted in a DeepSpeed run's ``mp_rank_00_model_states.pt``, a native run's ``rng-rank0.pt``, an
HF folder's ``pytorch_model.bin`` or a non-tensor entry of a DCP checkpoint: resume / eval / init_from_hf refuse
in one line naming the file, and the marker is never created."""
from __future__ import annotations

import os
import shlex
import shutil
import sys

import pytest
import torch

from tests.conftest import ROOT, run_cli

TINY = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
SMALL = ["model.vocab_size=64", "data.seq_len=32", "train.global_batch_size=4", "logging.plot=false",
         "train.eval_batches=1"]


class _Payload:
    """Pickles as ``os.system("touch MARKER")``: what a crafted checkpoint would run when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _plant(path: str, marker: str) -> None:
    """Add the payload to a torch.save file we wrote ourselves (so loading it here, unrestricted, is safe)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["evil"] = _Payload(marker)
    torch.save(state, path)


def _reseal(ckpt: str) -> None:
    """Rewrite a native checkpoint's COMPLETE marker for its current files, as whoever planted a file would: the
    marker's checksums catch damage, not an attacker (the unpickling itself must refuse)."""
    from llmforge.inference.run_loading import ensure_process_group
    ensure_process_group()
    try:
        from llmforge.checkpoint.integrity import write_marker
    except ImportError:  # a marker of sizes only
        import json
        from llmforge.checkpoint.checkpointer import _sizes
        with open(os.path.join(ckpt, "COMPLETE"), "w") as f:
            json.dump({"sizes": _sizes(ckpt)}, f)
        return
    write_marker(ckpt)


def _train(synth, run, *overrides, env=None):
    r = run_cli([sys.executable, "-m", "llmforge.train", TINY, f"data.paths=[{synth}]", f"run_dir={run}", *SMALL,
                 *overrides], timeout=300, env=env)
    return r


def _one_error_line(r, name: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def ds_run(synth_data, tmp_path_factory):
    """A one-step DeepSpeed ZeRO-1 run (model states + a ZeRO optimizer shard), single process."""
    pytest.importorskip("deepspeed")
    run = str(tmp_path_factory.mktemp("ds-unpickle") / "run")
    r = _train(synth_data, run, "engine=deepspeed", "parallel.zero_stage=1", "train.steps=1",
               env={"DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_deepspeed_resume_and_eval_refuse_a_planted_model_states_file(ds_run, synth_data, tmp_path, capsys):
    from llmforge.inference.eval import main as eval_main
    run = str(tmp_path / "run")
    shutil.copytree(ds_run, run)
    tag = os.path.join(run, "checkpoints", "step_00000001")
    states, marker = os.path.join(tag, "mp_rank_00_model_states.pt"), str(tmp_path / "pwned")
    _plant(states, marker)
    before = sorted(os.listdir(tag))
    r = _train(synth_data, run, "engine=deepspeed", "parallel.zero_stage=1", "train.steps=2",
               env={"DS_ACCELERATOR": "cpu"})
    line = _one_error_line(r, states)
    assert r.returncode == 1 and "posix.system" in line and "weights_only" not in line, line
    assert not os.path.exists(marker), "resume ran the planted payload"
    assert sorted(os.listdir(tag)) == before  # nothing of the run was removed
    # llmforge.eval consolidates the same tag through DeepSpeed's zero_to_fp32 (its own torch.load calls)
    capsys.readouterr()
    rc = eval_main([run])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not os.path.exists(marker), "eval ran the planted payload"
    assert len(err) == 1 and states in err[0] and "posix.system" in err[0], err


def test_deepspeed_scan_names_a_planted_optimizer_shard(ds_run, tmp_path):
    from llmforge.checkpoint.deepspeed_weights import scan_checkpoint
    run = str(tmp_path / "run")
    shutil.copytree(ds_run, run)
    tag = os.path.join(run, "checkpoints", "step_00000001")
    assert scan_checkpoint(tag) is None  # a real ZeRO checkpoint is tensors and allowed plain data only
    shard, marker = os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), str(tmp_path / "pwned")
    _plant(shard, marker)
    msg = scan_checkpoint(tag)
    assert msg and shard in msg and "posix.system" in msg and "\n" not in msg, msg
    assert not os.path.exists(marker)


def test_native_resume_refuses_a_planted_rng_file(synth_data, tmp_path):
    run, marker = str(tmp_path / "run"), str(tmp_path / "pwned")
    assert _train(synth_data, run, "train.steps=1").returncode == 0
    rng = os.path.join(run, "checkpoints", "step_00000001", "rng-rank0.pt")
    _plant(rng, marker)
    _reseal(os.path.dirname(rng))
    r = _train(synth_data, run, "train.steps=2")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert rng in r.stdout + r.stderr and "posix.system" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1, r.stderr[-3000:]
    assert not os.path.exists(marker), "resume ran the planted RNG payload"
    assert os.path.isfile(rng)


def test_init_from_hf_refuses_a_planted_pytorch_model_bin(synth_data, tmp_path):
    from llmforge.hf import save_hf
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=64,
                     max_seq_len=128)
    hf, marker = str(tmp_path / "hf"), str(tmp_path / "pwned")
    save_hf(args, Transformer(args).state_dict(), hf)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(hf, "model.safetensors"))
    os.remove(os.path.join(hf, "model.safetensors"))
    binary = os.path.join(hf, "pytorch_model.bin")
    torch.save(weights, binary)
    _plant(binary, marker)
    r = _train(synth_data, str(tmp_path / "run"), f"train.init_from_hf={hf}", "train.steps=1")
    line = _one_error_line(r, binary)
    assert r.returncode == 1 and "posix.system" in line and not os.path.exists(marker), line


def test_dcp_non_tensor_entry_is_unpickled_weights_only(tmp_path):
    """DCP's load_bytes calls torch.load(weights_only=False) for every non-tensor entry (optimizer hyper-parameters
    ...): through SafeFileSystemReader a crafted entry is refused, plain ones still load."""
    import torch.distributed.checkpoint as dcp
    from llmforge.core.safe_pickle import SafeFileSystemReader, UnsafePickleError
    ckpt, marker = str(tmp_path / "ckpt"), str(tmp_path / "pwned")
    dcp.save({"w": torch.ones(3), "lr": 0.5, "betas": (0.9, 0.95), "evil": _Payload(marker)}, checkpoint_id=ckpt,
             no_dist=True)
    plain = {"w": torch.zeros(3), "lr": 0.0, "betas": None}
    dcp.load(plain, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    assert plain["lr"] == 0.5 and plain["betas"] == (0.9, 0.95) and torch.equal(plain["w"], torch.ones(3))
    from torch.distributed.checkpoint.api import CheckpointException
    with pytest.raises(CheckpointException) as e:  # DCP wraps the reader's UnsafePickleError (a BaseException)
        dcp.load({"evil": None}, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    assert UnsafePickleError.__name__ in str(e.value) and f"refusing to load an entry of checkpoint {ckpt}: it " \
        "references posix.system" in str(e.value)
    assert not os.path.exists(marker), "a DCP entry ran the planted payload"


def _plant_dcp_entry(ckpt: str, fqn: str, marker: str) -> None:
    """Point one entry of a DCP checkpoint at an appended payload (its .metadata rewritten) and reseal the marker."""
    import io
    import pickle
    meta = os.path.join(ckpt, ".metadata")
    md = pickle.load(open(meta, "rb"))  # our own file: safe to unpickle here
    info = next(s for i, s in md.storage_data.items() if i.fqn == fqn)
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    data = os.path.join(ckpt, info.relative_path)
    info.offset, info.length = os.path.getsize(data), len(buf.getvalue())
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    pickle.dump(md, open(meta, "wb"))
    _reseal(ckpt)


def test_native_crafted_newest_checkpoint_is_refused_not_skipped(synth_data, tmp_path, capsys):
    """A crafted file in the newest of two checkpoints (marker resealed) is refused in one line naming it, exit 1:
    skipping to the older one would retrain over the tampered checkpoint and rotate the evidence away. The same
    for a crafted DCP entry: resume and eval name it in one line (was DCP's 'CheckpointException ranks:...')."""
    from llmforge.inference.eval import main as eval_main
    run, marker = str(tmp_path / "run"), str(tmp_path / "pwned")
    assert _train(synth_data, run, "train.steps=2", "checkpoint.interval=1").returncode == 0
    new = os.path.join(run, "checkpoints", "step_00000002")
    rng = os.path.join(new, "rng-rank0.pt")
    _plant(rng, marker)
    _reseal(new)
    before = sorted(os.listdir(new))
    r = _train(synth_data, run, "train.steps=3", "checkpoint.interval=1")
    line = _one_error_line(r, rng)
    assert r.returncode == 1 and "posix.system" in line and "resumed from" not in r.stdout, r.stdout[-2000:]
    assert sorted(os.listdir(new)) == before and not os.path.exists(marker)
    shutil.copy(os.path.join(os.path.dirname(new), "step_00000001", "rng-rank0.pt"), rng)
    _plant_dcp_entry(new, "model.tok_embeddings.weight", marker)
    r = _train(synth_data, run, "train.steps=3", "checkpoint.interval=1")
    line = _one_error_line(r, new)
    assert r.returncode == 1 and "posix.system" in line and not os.path.exists(marker), line
    capsys.readouterr()
    assert eval_main([run]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and new in err[0] and "posix.system" in err[0] and not os.path.exists(marker), err
