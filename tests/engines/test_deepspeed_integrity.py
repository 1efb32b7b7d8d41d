"""DeepSpeed checkpoints vouch for their content (issue 21 items 2 and 3 for engine=deepspeed).

Before: a tag was committed by DeepSpeed's ``latest`` file alone, and flipped bytes in ``mp_rank_00_model_states.pt``
or a ZeRO optimizer shard resumed, evaluated and exported silently. Now every tag holds a COMPLETE marker (each
file's size and xxh3-64, hashed by the rank that wrote it); resume, eval, generate and export_hf verify it, skip a
damaged tag for the previous one with a warning naming the file, and refuse in one line (exit 1, nothing removed)
when none is usable. Tags written before the markers still load. Also the native resume's last error line names
the file that refused every checkpoint (it named only the folder).
"""
import glob
import hashlib
import json
import os
import shutil
import sys

import pytest

from tests.conftest import ROOT, read_metrics, run_cli, train_cmd

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")

TINY = os.path.join(ROOT, "configs/train/tiny-cpu.yaml")
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
OLD, NEW = "step_00000002", "step_00000004"
SHARD1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
STATES = "mp_rank_00_model_states.pt"


def _common(data):
    return [f"data.paths=[{data}]", "model.vocab_size=64", "data.seq_len=32", "train.global_batch_size=4",
            "logging.plot=false", "train.eval_batches=1", "train.eval_interval=0", "engine=deepspeed"]


Z2 = ["parallel.zero_stage=2", "train.steps=4", "checkpoint.interval=2", "checkpoint.keep=2"]
PP = ["parallel.pp=2", "model.tie_embeddings=false", "train.steps=1"]


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """Two 2-rank DeepSpeed runs in one launch: ZeRO-2 (tags at steps 2 and 4) and PP (one tag, layer files)."""
    out = tmp_path_factory.mktemp("ds-integrity")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"config": "configs/train/tiny-cpu.yaml", "common": _common(synth_data),
                                "runs": [[f"run_dir={out / 'z2'}", *Z2], [f"run_dir={out / 'pp'}", *PP]]}))
    r = run_cli(train_cmd(2)[:-2] + [os.path.join(ROOT, "tests/engines/ds_runs.py"), str(spec)], timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def z2(trained, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained / "z2", run)
    return run


def _tag(run, tag):
    return os.path.join(run, "checkpoints", tag)


def _flip(path: str, n: int = 64) -> str:
    """Flip ``n`` bytes at the file's three-quarter mark (tensor data, past the pickle), size unchanged."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) * 3 // 4)
        data = f.read(n)
        f.seek(os.path.getsize(path) * 3 // 4)
        f.write(bytes(b ^ 0xFF for b in data))
    return path


def _snapshot(run):
    files = glob.glob(os.path.join(run, "checkpoints", "**"), recursive=True)
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files if os.path.isfile(f)}


def _resume(run, data, *extra):
    return run_cli(train_cmd(2) + [TINY, *_common(data), f"run_dir={run}", *Z2, *extra], timeout=300, env=ENV)


def test_marker_vouches_for_every_file_each_rank_wrote(trained):
    import xxhash
    for run, tags in (("z2", (OLD, NEW)), ("pp", ("step_00000001",))):
        root = trained / run / "checkpoints"
        assert not glob.glob(str(root / ".*")), os.listdir(root)  # no hidden save left behind
        assert open(root / "latest").read().strip() == tags[-1]  # DeepSpeed's own pointer still written
        for tag in tags:
            marker = json.load(open(root / tag / "COMPLETE"))
            files = sorted(f for f in os.listdir(root / tag) if f != "COMPLETE")
            assert sorted(marker["sizes"]) == sorted(marker["xxh3_64"]) == files
            for f in files:
                assert marker["xxh3_64"][f] == xxhash.xxh3_64(open(root / tag / f, "rb").read()).hexdigest()
    z2 = os.listdir(trained / "z2" / "checkpoints" / NEW)
    assert STATES in z2 and SHARD1 in z2 and SHARD1.replace("rank_1", "rank_0") in z2
    assert any(f.startswith("layer_") for f in os.listdir(trained / "pp" / "checkpoints" / "step_00000001"))


@pytest.mark.slow
def test_resume_skips_a_damaged_zero_shard_of_rank_1(z2, synth_data, trained):
    """Only rank 1 reads its shard, and the ranks verify a share of the files each: both skip to the older tag
    together, and steps 3-4 retrain exactly as the uninterrupted run did."""
    damaged = _flip(os.path.join(_tag(z2, NEW), SHARD1))
    r = _resume(z2, synth_data)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"warning: skipping checkpoint {_tag(z2, NEW)}: {damaged}: content differs" in out, out[-3000:]
    assert f"resumed from {_tag(z2, OLD)}" in out, out[-3000:]
    before, after = read_metrics(trained / "z2"), read_metrics(z2)
    for step in (3, 4):
        assert abs(after[step]["loss"] - before[step]["loss"]) < 1e-6, (step, after[step], before[step])


@pytest.mark.slow
def test_resume_with_every_tag_damaged_refuses_in_one_line_and_removes_nothing(z2, synth_data):
    bad = [_flip(os.path.join(_tag(z2, tag), STATES)) for tag in (OLD, NEW)]
    before = _snapshot(z2)
    r = _resume(z2, synth_data, "train.steps=6")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # rank 0 alone prints it
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-3000:]
    assert all(f"{b}: content differs" in errors[0] for b in bad), errors
    assert _snapshot(z2) == before and not os.path.exists(_tag(z2, "step_00000006"))


def _readers(run, tmp_path, *extra):
    from llmforge.inference.eval import main as eval_main
    from llmforge.export_hf import main as export_main
    from llmforge.inference.generate import main as generate_main
    return {"eval": lambda: eval_main([run, *extra]),
            "generate": lambda: generate_main([run, "--prompt", "5 6 7", "--max-new-tokens", "2", *extra]),
            "export_hf": lambda: export_main([run, str(tmp_path / "hf")])}


@pytest.mark.parametrize("reader, victim", [("eval", STATES), ("generate", SHARD1), ("export_hf", SHARD1)])
def test_readers_skip_a_damaged_tag_for_the_older_one(z2, tmp_path, capsys, reader, victim):
    damaged = _flip(os.path.join(_tag(z2, NEW), victim))
    assert _readers(z2, tmp_path)[reader]() == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {_tag(z2, NEW)}: {damaged}: content differs" in err, err
    if reader == "eval":
        assert json.load(open(os.path.join(z2, "eval.json")))["step"] == 2


def test_explicit_damaged_checkpoint_and_all_damaged_are_one_line(z2, trained, tmp_path, capsys):
    from llmforge.inference.eval import main as eval_main
    damaged = _flip(os.path.join(_tag(z2, NEW), STATES))
    assert eval_main([z2, "--checkpoint", _tag(z2, NEW)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --checkpoint {_tag(z2, NEW)}: {damaged}: content"), err
    pp = str(tmp_path / "pp")  # PP: the layer files are vouched for too; its only tag damaged -> nothing usable
    shutil.copytree(trained / "pp", pp)
    layer = _flip(sorted(glob.glob(os.path.join(_tag(pp, "step_00000001"), "layer_*")))[0])
    before = _snapshot(pp)
    assert eval_main([pp]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"{layer}: content differs" in err[0], err
    assert _snapshot(pp) == before


def test_tags_written_before_the_markers_still_load(z2, capsys):
    """A run saved by an earlier version: no COMPLETE in any tag, `latest` names the newest. Loaded unverified."""
    from llmforge.inference.eval import main as eval_main
    for tag in (OLD, NEW):
        os.remove(os.path.join(_tag(z2, tag), "COMPLETE"))
    assert eval_main([z2]) == 0, capsys.readouterr().err
    assert json.load(open(os.path.join(z2, "eval.json")))["step"] == 4
    assert "warning" not in capsys.readouterr().err


def test_native_resume_error_names_the_file_that_refused(synth_data, tmp_path, capsys):
    """A garbled rng-rank0.pt (its marker resealed, so only the RNG file's own check refuses it) in the only
    checkpoint: the one stderr error line used to name the checkpoints folder only, the file went to stdout."""
    from llmforge.train import main as train_main
    from tests.reliability.test_unpickle import _reseal
    run = str(tmp_path / "run")
    args = [TINY, f"data.paths=[{synth_data}]", "model.vocab_size=64", "data.seq_len=32", "train.global_batch_size=4",
            "logging.plot=false", "train.eval_batches=1", f"run_dir={run}"]
    assert train_main(args + ["train.steps=1"]) == 0
    rng = os.path.join(_tag(run, "step_00000001"), "rng-rank0.pt")
    with open(rng, "r+b") as f:
        f.write(b"\x00garbage" * 8)
    _reseal(os.path.dirname(rng))
    capsys.readouterr()
    assert train_main(args + ["train.steps=2"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and rng in errors[0] and "not a readable RNG state" in errors[0], errors


def test_interrupted_saves_are_finished_or_removed_and_never_listed(tmp_path):
    """kill -9 in a save leaves ``.step_N.tmp``: with its marker (killed before the rename) the save is finished,
    without it is removed; an older version's interrupted tag (no marker, newer than `latest`) is not a checkpoint,
    its committed ones (no marker, at or below `latest`) are."""
    from llmforge.train.engines.deepspeed_ckpt import _remove_interrupted, _resume_listing
    root = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004", "step_00000006", ".step_00000008.tmp", ".step_00000010.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / STATES).write_bytes(b"x")
    (root / "latest").write_text("step_00000004")
    for name in ("step_00000004", ".step_00000008.tmp"):
        (root / name / "COMPLETE").write_text('{"sizes": {}}')
    listing = _resume_listing(str(root))
    assert [(os.path.basename(p), why) for p, why in listing] == [
        ("step_00000008", ""), ("step_00000004", ""), ("step_00000002", "")]
    _remove_interrupted(str(root), print)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000004", "step_00000008"]
