"""Checkpoint content integrity (issue 21 items 2, 3 and the eval-during-rotation case): the COMPLETE marker vouches
for each file's content, every reader verifies it, a damaged checkpoint is skipped for the previous one with a
warning naming the file, a run dir whose checkpoints are all unusable is refused and left untouched, and rotation
keeps a checkpoint a reader holds."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import pytest

from tests.conftest import ROOT, read_metrics, run_cli, train_cmd, write_synthetic_shards

TINY = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
OLD, NEW = "step_00000002", "step_00000004"


def _args(run, data, nproc=1):
    return train_cmd(nproc) + [TINY, f"data.paths=[{data}]", f"run_dir={run}", "model.vocab_size=64", "train.steps=4",
                          "checkpoint.interval=2", "checkpoint.keep=2", "train.eval_interval=0", "data.seq_len=64",
                          "train.global_batch_size=4"] + ([f"parallel.dp_shard={nproc}", "parallel.zero_stage=3"]
                                                          if nproc > 1 else [])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 (the reference for every copy below)."""
    root = tmp_path_factory.mktemp("integrity")
    data = write_synthetic_shards(str(root / "synth"), n_train=40, n_valid=6)
    run = str(root / "run")
    p = run_cli(_args(run, data), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return {"run": run, "data": data, "metrics": read_metrics(run)}


@pytest.fixture
def run(trained, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(trained["run"], dst)
    return dst


def _ckpt(run: str, step_dir: str) -> str:
    return os.path.join(run, "checkpoints", step_dir)


def _flip(ckpt: str, prefix: str, n: int, file: str | None = None) -> str:
    """Flip ``n`` bytes in the middle of the first stored tensor whose name starts with ``prefix`` (its region in
    the .distcp file, located through DCP's metadata; in ``file`` if given), sizes unchanged; returns that file."""
    from llmforge.core.safe_pickle import load_metadata
    md = load_metadata(os.path.join(ckpt, ".metadata"))
    index, info = next((i, s) for i, s in md.storage_data.items()
                       if i.fqn.startswith(prefix) and file in (None, s.relative_path))
    path = os.path.join(ckpt, info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        data = f.read(n)
        f.seek(info.offset + info.length // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return path


def _snapshot(run: str) -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(run, "checkpoints", "**"), recursive=True) +
                       glob.glob(os.path.join(run, "checkpoints", "**", ".*"), recursive=True)):
        if os.path.isfile(path):
            out[os.path.relpath(path, run)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_marker_holds_a_content_hash_for_every_file(trained):
    for step_dir in (OLD, NEW):
        ckpt = _ckpt(trained["run"], step_dir)
        marker = json.load(open(os.path.join(ckpt, "COMPLETE")))
        assert set(marker["xxh3_64"]) == set(marker["sizes"]) == {
            ".metadata", "__0_0.distcp", "rng-rank0.pt", "trainer_state.json"}


def test_flipped_optimizer_state_resumes_from_the_older_checkpoint(trained, run):
    """Issue 21 item 2: 48 flipped bytes in the optimizer state used to resume silently (the loss exploded)."""
    damaged = _flip(_ckpt(run, NEW), "optim.", 48)
    p = run_cli(_args(run, trained["data"]), timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-2000:]
    assert f"warning: cannot load checkpoint {_ckpt(run, NEW)}: {damaged}: content differs" in out, out[-2000:]
    assert f"resumed from {_ckpt(run, OLD)}" in out, out[-2000:]
    metrics = read_metrics(run)
    for step in (3, 4):  # retrained from step 2: equal to the uninterrupted run, bit for bit
        assert metrics[step]["loss"] == trained["metrics"][step]["loss"], (step, metrics[step])


def test_two_ranks_flipped_state_of_rank_1_resumes_from_the_older_checkpoint(tmp_path):
    """FSDP over 2 ranks: each rank hashes its own __R_0.distcp, each verifies a share of the files; damage in
    rank 1's file is found (by rank 0) and every rank skips to the older checkpoint together."""
    data = write_synthetic_shards(str(tmp_path / "synth"), n_train=40, n_valid=6)
    run = str(tmp_path / "run")
    p = run_cli(_args(run, data, nproc=2), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    reference = read_metrics(run)
    damaged = _flip(_ckpt(run, NEW), "optim.", 48, file="__1_0.distcp")
    p = run_cli(_args(run, data, nproc=2), timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and f"{damaged}: content differs" in out and f"resumed from {_ckpt(run, OLD)}" in out, \
        out[-3000:]
    assert [read_metrics(run)[s]["loss"] for s in (3, 4)] == [reference[s]["loss"] for s in (3, 4)]


def _readers(run, tmp_path):
    """Each inference CLI on ``run`` in this process: (exit status, stderr lines)."""
    from llmforge.inference.eval import main as eval_main
    from llmforge.export_hf import main as export_main
    from llmforge.inference.generate import main as generate_main
    return {"eval": lambda: eval_main([run]),
            "generate": lambda: generate_main([run, "--prompt", "5 6 7", "--max-new-tokens", "2"]),
            "export_hf": lambda: export_main([run, str(tmp_path / "hf")])}


@pytest.mark.parametrize("reader", ["eval", "generate", "export_hf"])
def test_flipped_embeddings_readers_use_the_older_checkpoint(run, tmp_path, capsys, reader):
    damaged = _flip(_ckpt(run, NEW), "model.tok_embeddings", 64)
    assert _readers(run, tmp_path)[reader]() == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {_ckpt(run, NEW)}: {damaged}: content differs" in err, err
    if reader == "eval":
        assert json.load(open(os.path.join(run, "eval.json")))["step"] == 2


def test_flipped_embeddings_load_run_equals_the_older_checkpoint(run):
    import torch
    from llmforge.inference.run_loading import load_run
    _flip(_ckpt(run, NEW), "model.tok_embeddings", 64)
    warnings = []
    got = load_run(run, log=warnings.append)
    want = load_run(run, checkpoint=_ckpt(run, OLD))
    assert got.checkpoint == _ckpt(run, OLD) and got.step == 2 and len(warnings) == 1
    for (name, a), (_, b) in zip(got.model.state_dict().items(), want.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("reader", ["eval", "generate", "export_hf"])
def test_the_only_checkpoint_damaged_readers_refuse_in_one_line(run, tmp_path, capsys, reader):
    shutil.rmtree(_ckpt(run, OLD))
    damaged = _flip(_ckpt(run, NEW), "model.tok_embeddings", 64)
    before = _snapshot(run)
    assert _readers(run, tmp_path)[reader]() == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0] and _ckpt(run, NEW) in errors[0], errors
    assert _snapshot(run) == before and not os.path.exists(tmp_path / "hf")


def test_explicit_damaged_checkpoint_is_refused_naming_the_file(run, capsys):
    from llmforge.inference.eval import main as eval_main
    damaged = _flip(_ckpt(run, NEW), "model.tok_embeddings", 64)
    assert eval_main([run, "--checkpoint", _ckpt(run, NEW)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint") and damaged in err[0], err
    assert not os.path.exists(os.path.join(run, "eval.json"))


def test_damaged_rng_or_trainer_state_is_named(run):
    from llmforge.checkpoint.checkpointer import Checkpointer, DamagedCheckpoint
    from llmforge.inference.run_loading import ensure_process_group, load_run
    model = load_run(run).model
    for name in ("rng-rank0.pt", "trainer_state.json"):
        path = os.path.join(_ckpt(run, NEW), name)
        good = open(path, "rb").read()
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01  # one bit
        open(path, "wb").write(bytes(data))
        ensure_process_group()
        with pytest.raises(DamagedCheckpoint) as e:
            Checkpointer(os.path.join(run, "checkpoints")).load(_ckpt(run, NEW), [model], [], load_optimizer=False)
        assert str(e.value).startswith(f"{path}: content differs") and "\n" not in str(e.value)
        open(path, "wb").write(good)


def test_init_from_a_damaged_run_starts_from_the_older_checkpoint(run, capsys):
    import torch
    from llmforge.core.config import RunConfig, load_config
    from llmforge.model.presets import model_args
    from llmforge.model.transformer import Transformer
    from llmforge.inference.run_loading import ensure_process_group, load_run
    from llmforge.train.init_from import load_init_weights
    damaged = _flip(_ckpt(run, NEW), "model.tok_embeddings", 64)
    want = load_run(run, checkpoint=_ckpt(run, OLD)).model
    cfg = load_config(RunConfig, os.path.join(run, "config.yaml"))
    model = Transformer(model_args(cfg.model, None))
    ensure_process_group()
    assert load_init_weights([model], run) == _ckpt(run, OLD)
    assert damaged in capsys.readouterr().err
    assert torch.equal(model.tok_embeddings.weight, want.tok_embeddings.weight)


def _truncate(ckpt: str) -> None:
    path = os.path.join(ckpt, "__0_0.distcp")
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_all_checkpoints_unusable_resume_refuses_and_deletes_nothing(trained, run, damage):
    """Issue 21 item 3: this used to restart from step 1 and rotate the damaged checkpoints away."""
    for step_dir in (OLD, NEW):
        _flip(_ckpt(run, step_dir), "optim.", 48) if damage == "flipped" else _truncate(_ckpt(run, step_dir))
    before, metrics = _snapshot(run), open(os.path.join(run, "metrics.jsonl")).read()
    p = run_cli(_args(run, trained["data"]), timeout=300)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and "cannot resume" in errors[0] and _ckpt(run, NEW) in errors[0], errors
    assert _snapshot(run) == before and open(os.path.join(run, "metrics.jsonl")).read() == metrics


def test_old_marker_without_hashes_still_loads_by_size(run):
    from llmforge.inference.run_loading import load_run
    for step_dir in (OLD, NEW):
        marker = os.path.join(_ckpt(run, step_dir), "COMPLETE")
        json.dump({"sizes": json.load(open(marker))["sizes"]}, open(marker, "w"))
    assert load_run(run).step == 4
    _truncate(_ckpt(run, NEW))
    assert load_run(run, log=lambda m: None).step == 2  # sizes are still checked


def test_a_save_interrupted_between_marker_and_rename_is_kept(run):
    from llmforge.checkpoint.checkpointer import resume_candidates
    from llmforge.inference.run_loading import ensure_process_group
    hidden = os.path.join(run, "checkpoints", f".{NEW}.tmp")
    os.rename(_ckpt(run, NEW), hidden)
    ensure_process_group()
    assert resume_candidates(os.path.join(run, "checkpoints"), log=lambda m: None) == [_ckpt(run, NEW), _ckpt(run, OLD)]
    assert not os.path.exists(hidden)


def test_rotation_keeps_a_checkpoint_a_reader_holds(run):
    """Eval while training with checkpoint.keep=1: the reader's shared lock keeps rotation off its checkpoint."""
    from llmforge.checkpoint.checkpointer import Checkpointer, list_checkpoints
    from llmforge.checkpoint.integrity import reading
    root = os.path.join(run, "checkpoints")
    ck = Checkpointer(root, keep=1)
    with reading(_ckpt(run, OLD)) as status:
        assert status is None
        ck._rotate()
        assert [s for s, _ in list_checkpoints(root)] == [4, 2]  # held: kept for now
    ck._rotate()
    assert [s for s, _ in list_checkpoints(root)] == [4] and os.listdir(root) == [NEW]


def test_reader_lists_again_when_its_checkpoint_is_rotated_away(run):
    """The race of the issue, made deterministic: a newer checkpoint is saved and the listed one rotated away
    between the reader's listing and its lock; the reader then loads the newer one instead of failing."""
    from llmforge.checkpoint.checkpointer import Checkpointer, CheckpointVanished, load_newest
    from llmforge.checkpoint.integrity import remove_unless_read
    from llmforge.inference.run_loading import ensure_process_group
    root = os.path.join(run, "checkpoints")
    shutil.rmtree(_ckpt(run, OLD))
    model = __import__("llmforge.inference.run_loading", fromlist=["load_run"]).load_run(run).model
    ensure_process_group()
    ck, tried = Checkpointer(root), []

    def load(path):
        tried.append(os.path.basename(path))
        if len(tried) == 1:  # training saves step 6 and rotates step 4 away (keep=1) right now
            shutil.copytree(path, _ckpt(run, "step_00000006"))
            assert remove_unless_read(path)
        return ck.load(path, [model], [], load_optimizer=False, load_rng=False)
    path, state = load_newest(root, load, log=pytest.fail)
    assert tried == [NEW, "step_00000006"] and path == _ckpt(run, "step_00000006") and state["step"] == 4
    with pytest.raises(CheckpointVanished, match="checkpoint not found"):
        ck.load(_ckpt(run, NEW), [model], [], load_optimizer=False)


def test_rotation_during_a_load_keeps_the_checkpoint_being_loaded(run, monkeypatch):
    """Checkpointer.load itself holds the reader lock: a rotation in the middle of the load keeps the checkpoint."""
    from llmforge.checkpoint.checkpointer import Checkpointer, list_checkpoints
    from llmforge.inference.run_loading import ensure_process_group, load_run
    root = os.path.join(run, "checkpoints")
    model = load_run(run).model
    ensure_process_group()
    ck, real = Checkpointer(root, keep=1), Checkpointer._load

    def load_while_rotating(self, path, *a):
        ck._rotate()  # what a training that just saved does meanwhile
        return real(self, path, *a)
    monkeypatch.setattr(Checkpointer, "_load", load_while_rotating)
    assert ck.load(_ckpt(run, OLD), [model], [], load_optimizer=False, load_rng=False)["step"] == 2
    assert [s for s, _ in list_checkpoints(root)] == [4, 2]
    ck._rotate()
    assert [s for s, _ in list_checkpoints(root)] == [4]


def test_every_checkpoint_damaged_reader_refusal_is_the_only_stderr_line(run, capsys):
    """A refusal is one line on stderr: the skipped checkpoints' warnings are said only when an older one loads
    (the refusal already names each damaged file)."""
    from llmforge.inference.eval import main as eval_main
    damaged = [_flip(_ckpt(run, step_dir), "model.tok_embeddings", 64) for step_dir in (OLD, NEW)]
    capsys.readouterr()
    assert eval_main([run]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no usable checkpoint") and all(d in err[0] for d in damaged), err


def test_a_garbled_entry_under_a_rewritten_marker_is_skipped_as_damage(run):
    """The marker cannot catch damage it was rewritten to vouch for; an entry that no longer unpickles is still
    damage (skipped for the older checkpoint with a warning), not DCP's 'CheckpointException ranks:...' (exit 2)."""
    from llmforge.checkpoint.integrity import write_marker
    from llmforge.inference.run_loading import ensure_process_group, load_run
    from llmforge.core.safe_pickle import load_metadata
    ckpt = _ckpt(run, NEW)
    info = next(s for i, s in load_metadata(os.path.join(ckpt, ".metadata")).storage_data.items()
                if i.fqn == "model.tok_embeddings.weight")
    with open(os.path.join(ckpt, info.relative_path), "r+b") as f:  # the entry's serialization header
        f.seek(info.offset)
        head = f.read(16)
        f.seek(info.offset)
        f.write(bytes(b ^ 0xFF for b in head))
    ensure_process_group()
    write_marker(ckpt)
    warnings = []
    assert load_run(run, log=warnings.append).step == 2
    assert len(warnings) == 1 and f"skipping checkpoint {ckpt}: " in warnings[0], warnings
    assert "unreadable" in warnings[0], warnings


def test_init_from_a_run_whose_checkpoints_are_all_damaged_is_one_line_naming_the_key(run, capsys):
    from llmforge.checkpoint.checkpointer import NoUsableCheckpoint
    from llmforge.core.config import RunConfig, load_config
    from llmforge.model.presets import model_args
    from llmforge.model.transformer import Transformer
    from llmforge.inference.run_loading import ensure_process_group
    from llmforge.train.init_from import load_init_weights
    damaged = [_flip(_ckpt(run, step_dir), "model.tok_embeddings", 64) for step_dir in (OLD, NEW)]
    model = Transformer(model_args(load_config(RunConfig, os.path.join(run, "config.yaml")).model, None))
    ensure_process_group()
    capsys.readouterr()
    with pytest.raises(NoUsableCheckpoint) as e:
        load_init_weights([model], run)
    assert str(e.value).startswith("train.init_from: ") and all(d in str(e.value) for d in damaged), str(e.value)
    assert capsys.readouterr().err == ""  # the refusal is the only line: no warnings before it


def test_a_deleted_metadata_file_is_skipped_naming_it(run):
    from llmforge.inference.run_loading import load_run
    os.remove(os.path.join(_ckpt(run, NEW), ".metadata"))
    warnings = []
    assert load_run(run, log=warnings.append).step == 2
    assert len(warnings) == 1 and f"{_ckpt(run, NEW)}: .metadata is missing (the COMPLETE marker lists it" in \
        warnings[0], warnings


def test_no_complete_checkpoint_line_names_why_each_is_incomplete(run, capsys):
    from llmforge.inference.eval import main as eval_main
    os.remove(os.path.join(_ckpt(run, NEW), "COMPLETE"))
    _truncate(_ckpt(run, OLD))
    capsys.readouterr()
    assert eval_main([run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no complete checkpoint under"), err
    assert f"{_ckpt(run, NEW)}: no COMPLETE marker" in err[0] and f"{_ckpt(run, OLD)}: __0_0.distcp is" in err[0], err


def test_two_ranks_agree_when_only_rank_1_cannot_load_its_own_file(tmp_path):
    """A file only rank 1 reads (its RNG state) that the marker vouches for (rewritten to match): crafted, every
    rank refuses and the refusal is printed once; garbled, every rank resumes from the older checkpoint together
    (rank 1 alone used to skip to it while rank 0 trained on, and their collectives parted)."""
    import torch
    from llmforge.checkpoint.integrity import HASH, _file_checksums
    from tests.reliability.test_unpickle import _Payload
    data = write_synthetic_shards(str(tmp_path / "synth"), n_train=40, n_valid=6)
    run = str(tmp_path / "run")
    assert run_cli(_args(run, data, nproc=2), timeout=300).returncode == 0
    reference = read_metrics(run)
    rng, marker_path = os.path.join(_ckpt(run, NEW), "rng-rank1.pt"), os.path.join(_ckpt(run, NEW), "COMPLETE")
    size = os.path.getsize(rng)

    def reseal():
        marker = json.load(open(marker_path))
        name = "rng-rank1.pt"
        marker["sizes"][name], marker[HASH][name] = os.path.getsize(rng), _file_checksums([rng])[rng]
        json.dump(marker, open(marker_path, "w"))
    torch.save({"torch": _Payload(str(tmp_path / "pwned"))}, rng)
    reseal()
    p = run_cli(_args(run, data, nproc=2), timeout=300)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1 and rng in errors[0], p.stderr[-3000:]
    assert not os.path.exists(tmp_path / "pwned")
    with open(rng, "wb") as f:
        f.write(b"\xff" * size)
    reseal()
    p = run_cli(_args(run, data, nproc=2), timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and f"cannot load checkpoint {_ckpt(run, NEW)}: {rng}" in out, out[-3000:]
    assert f"resumed from {_ckpt(run, OLD)}" in out, out[-3000:]
    assert [read_metrics(run)[s]["loss"] for s in (3, 4)] == [reference[s]["loss"] for s in (3, 4)]
