"""One trainer per run dir, runs never mixed, and a resume that refuses inputs changed under it, in one line,
before anything in the run dir is written."""
import os
import shutil

import pytest

from llmforge.train.run_guard import RunLock
from tests.conftest import read_metrics, run_cli, train_cmd, write_synthetic_shards

TINY = "configs/train/tiny-cpu.yaml"


def _args(run_dir, data, *extra):
    return train_cmd() + [TINY, f"data.paths=[{data}]", f"run_dir={run_dir}", "train.steps=2", "data.seq_len=32",
                          "logging.plot=false", "train.eval_batches=1", *extra]


def _snapshot(run_dir):
    out = {}
    for root, _, files in os.walk(run_dir):
        for f in files:
            if f != ".llmforge.lock":
                p = os.path.join(root, f)
                out[os.path.relpath(p, run_dir)] = open(p, "rb").read()
    return out


def _tokenizer(path, text_seed):
    import sentencepiece as spm
    words = [f"w{(i * 7919 + text_seed) % 997}x{i % 13}" for i in range(3000)]
    src = path + ".txt"
    open(src, "w").write("\n".join(" ".join(words[i:i + 12]) for i in range(0, 3000, 12)))
    spm.SentencePieceTrainer.train(input=src, model_prefix=path[:-len(".model")], vocab_size=120, model_type="bpe",
                                   minloglevel=2)
    os.remove(src)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    data = write_synthetic_shards(str(root / "data"), n_train=40, n_valid=4)
    _tokenizer(os.path.join(data, "tokenizer.model"), 1)
    run_dir = str(root / "run")
    p = run_cli(_args(run_dir, data))
    assert p.returncode == 0, p.stderr
    return root, data, run_dir


def _refused(args, run_dir):
    before = _snapshot(run_dir)
    p = run_cli(args)
    assert p.returncode == 2, p.stdout[-1000:] + p.stderr[-1000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert _snapshot(run_dir) == before  # nothing written: config.yaml, tokenizer, metrics, checkpoints as they were
    return lines[0]


@pytest.mark.parametrize("change, key", [("data.seq_len=16", "data.seq_len changed (32 -> 16)"),
                                         ("model.dim=32", "model.dim changed (64 -> 32)"),
                                         ("seed=7", "seed changed (1234 -> 7)")])
def test_resume_with_changed_shape_is_refused(trained, change, key):
    _, data, run_dir = trained
    line = _refused(_args(run_dir, data, "train.steps=3", change), run_dir)
    assert key in line and "cannot resume" in line


def test_resume_with_replaced_tokenizer_is_refused(trained, tmp_path):
    root, data, run_dir = trained
    other = str(tmp_path / "data")
    shutil.copytree(data, other)
    _tokenizer(os.path.join(other, "tokenizer.model"), 2)  # the data folder rebuilt with another tokenizer
    line = _refused(_args(run_dir, other, "train.steps=3"), run_dir)
    assert "data.paths changed" in line  # another folder: refused before the tokenizer is even compared
    run_copy = str(tmp_path / "run")
    shutil.copytree(run_dir, run_copy)
    os.replace(os.path.join(other, "tokenizer.model"), os.path.join(data, "tokenizer.model.new"))
    saved = open(os.path.join(data, "tokenizer.model"), "rb").read()
    try:
        os.replace(os.path.join(data, "tokenizer.model.new"), os.path.join(data, "tokenizer.model"))
        line = _refused(_args(run_dir, data, "train.steps=3"), run_dir)
        assert "the tokenizer file changed" in line
    finally:
        open(os.path.join(data, "tokenizer.model"), "wb").write(saved)


def test_allowed_changes_are_logged(trained, tmp_path):
    _, data, run_dir = trained
    run_copy = str(tmp_path / "run")
    shutil.copytree(run_dir, run_copy)
    p = run_cli(_args(run_copy, data, "train.steps=3", "train.lr=0.001"))
    assert p.returncode == 0, p.stderr
    assert "resume: train.lr changed 0.003 -> 0.001" in p.stdout and "resumed from" in p.stdout
    assert sorted(read_metrics(run_copy)) == [1, 2, 3]


def test_resume_false_into_a_run_with_checkpoints_is_refused(trained):
    _, data, run_dir = trained
    line = _refused(_args(run_dir, data, "checkpoint.resume=false"), run_dir)
    assert "already holds checkpoints" in line and "checkpoint.resume=false" in line


def test_second_trainer_on_a_locked_run_dir_is_refused(trained):
    _, data, run_dir = trained
    lock = RunLock(run_dir).acquire()  # a live holder (this test process)
    try:
        line = _refused(_args(run_dir, data, "train.steps=3", "train.lr=0.01"), run_dir)
        assert f"is in use by pid {os.getpid()}" in line
    finally:
        lock.release()
    p = run_cli(_args(run_dir, data))  # released: the run dir is usable again (rerun of a finished run)
    assert p.returncode == 0 and "already finished" in p.stdout, p.stderr
