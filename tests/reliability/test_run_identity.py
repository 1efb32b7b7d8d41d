"""Issue 21 items 4-6 on the trainer side: a run dir and an export folder are written only where llmforge owns
the folder; a resume checks what the data *is* (shards rebuilt in place are refused); a start from another model
checks its family and tokenizer against the run; the vocabulary check reads the tokens, not the stats sidecar.
Every refusal is one ``error:`` line naming the file or key, exit status 2, with the user's files unchanged."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest

from llmforge.export_hf import main as export_main
from llmforge.hf import EXPORT_MARKER, save_hf
from llmforge.train.run_guard import LOCK_NAME, RUN_MARKER
from llmforge.train import main as train_main
from tests.trainer.conftest import make_data, train_run


def _snapshot(folder):
    """Every file and folder with its bytes; the run's own lock (rewritten with its holder by each start) aside."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in [n for n in files + dirs if n != LOCK_NAME]:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = open(p, "rb").read() if os.path.isfile(p) else None
    return out


def _train(capsys, run_dir, data, *extra):
    capsys.readouterr()
    rc = train_main(["configs/train/tiny-cpu.yaml", f"data.paths=[{data}]", f"run_dir={run_dir}", "train.steps=2",
                     "data.seq_len=32", "train.global_batch_size=4", "train.eval_interval=0", "logging.plot=false",
                     "checkpoint.interval=0", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


def _other_tokenizer(data, dst):
    """``data`` with its tokenizer.model replaced by one trained on other text (same vocab size, other pieces)."""
    import sentencepiece as spm
    shutil.copytree(data, dst)
    text = [" ".join(f"q{(i * 31 + j) % 211}z{j % 7}" for j in range(20)) for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), vocab_size=300, model_type="bpe", byte_fallback=True,
                                   model_prefix=os.path.join(dst, "tokenizer"), unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    data = make_data(str(root / "data"))
    run = train_run(str(root / "run"), data, "train.steps=2")
    hf = str(root / "hf")
    assert export_main([run, hf]) == 0
    return {"root": root, "data": data, "run": run, "hf": hf, "other": _other_tokenizer(data, str(root / "other"))}


# ------------------------------------------------------------------------------------------------ item 5: folders
def test_training_into_a_folder_of_the_users_files_is_refused(env, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    (user / "config.yaml").write_text("model:\n  dim: 8\ntrain: {}\ndata: {}\n")  # their own config, not a run
    (user / "loss.png").write_bytes(b"\x89PNG my plot")
    before = _snapshot(user)
    line = _one_line(*_train(capsys, user, env["data"])[::2])
    assert str(user) in line and "notes.txt" in line and "not written by llmforge" in line
    assert _snapshot(user) == before and not (user / LOCK_NAME).exists()  # not even the lock was written


def test_new_empty_and_older_run_dirs_are_trained_into(env, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _train(capsys, empty, env["data"])
    assert rc == 0, err
    assert (empty / RUN_MARKER).is_file() and (empty / "config.yaml").is_file()
    older = str(tmp_path / "older")  # a run dir written before the marker existed keeps resuming
    shutil.copytree(env["run"], older)
    os.remove(os.path.join(older, RUN_MARKER))
    rc, out, err = _train(capsys, older, env["data"], "train.steps=3")
    assert rc == 0 and "resumed from" in out, err
    assert os.path.isfile(os.path.join(older, RUN_MARKER))


def test_export_into_a_folder_it_did_not_write_is_refused(env, tmp_path, capsys):
    user = tmp_path / "card"
    (user / "assets").mkdir(parents=True)
    (user / "config.json").write_text("{}")
    (user / "README.md").write_text("my card\n")
    before = _snapshot(user)
    capsys.readouterr()
    line = _one_line(export_main([env["run"], str(user)]), capsys.readouterr().err)
    assert str(user) in line and "README.md" in line and "assets" in line
    assert _snapshot(user) == before
    # its own export is replaced; once the user adds a file to it, it is theirs too
    assert os.path.isfile(os.path.join(env["hf"], EXPORT_MARKER))
    again = shutil.copytree(env["hf"], str(tmp_path / "again"))
    assert export_main([env["run"], again]) == 0
    open(os.path.join(again, "README.md"), "w").write("my notes\n")
    line = _one_line(export_main([env["run"], again]), capsys.readouterr().err)
    assert "earlier export" in line and "README.md" in line
    assert open(os.path.join(again, "README.md")).read() == "my notes\n"


def test_export_through_a_symlink_updates_its_target_and_keeps_the_link(env, tmp_path, capsys):
    """A link to an earlier export used to be renamed to LINK.old<pid> (left behind) and replaced by a folder."""
    target = shutil.copytree(env["hf"], str(tmp_path / "models" / "v1"))
    link = tmp_path / "latest"
    link.symlink_to(target)
    os.remove(os.path.join(target, "generation_config.json"))  # so a re-export shows in the target
    assert export_main([env["run"], str(link)]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == target
    assert os.path.isfile(os.path.join(target, "generation_config.json"))
    assert sorted(os.listdir(tmp_path)) == ["latest", "models"] and os.listdir(tmp_path / "models") == ["v1"]


def test_export_over_a_file_the_user_edited_in_an_earlier_export_is_refused(env, tmp_path, capsys):
    """Only names were compared: a hand-tuned generation_config.json was replaced by the next export."""
    again = shutil.copytree(env["hf"], str(tmp_path / "again"))
    gen = os.path.join(again, "generation_config.json")
    open(gen, "w").write('{"temperature": 0.2}\n')
    capsys.readouterr()
    line = _one_line(export_main([env["run"], again]), capsys.readouterr().err)
    assert "edited since" in line and "generation_config.json" in line
    assert open(gen).read() == '{"temperature": 0.2}\n'


def test_a_run_dir_under_tilde_is_the_home_folder(env, tmp_path, capsys, monkeypatch):
    """`run_dir: ~/runs/x` in a YAML file (no shell to expand it) used to make a folder named ~ in the cwd; data.paths
    and train.init_from under ~ were not found."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    os.symlink(env["data"], tmp_path / "home" / "data")
    os.symlink(env["run"], tmp_path / "home" / "base")
    rc, _, err = _train(capsys, "~/runs/x", "~/data", "train.init_from=~/base")
    assert rc == 0, err
    assert (tmp_path / "home" / "runs" / "x" / RUN_MARKER).is_file() and not os.path.exists("~")


def test_a_run_dir_that_is_a_file_is_refused_as_one(env, tmp_path, capsys):
    path = tmp_path / "run"
    path.write_text("mine\n")
    line = _one_line(*_train(capsys, path, env["data"])[::2])
    assert line == f"error: run_dir {path} is a file, not a folder: choose a new or empty folder"
    assert path.read_text() == "mine\n"

# ------------------------------------------------------------------------------------------------ item 4: shards
def test_resume_on_shards_rebuilt_in_place_is_refused(env, tmp_path, capsys):
    from data_pipeline.shards import IndexedShard, ShardWriter
    data = shutil.copytree(env["data"], str(tmp_path / "data"))
    run = str(tmp_path / "run")
    assert _train(capsys, run, data)[0] == 0
    older = shutil.copytree(run, str(tmp_path / "older"))
    prefix = os.path.join(data, "shards", "train-00000")
    shard = IndexedShard(prefix)
    docs = [shard.doc(i)[::-1].copy() for i in range(len(shard))]  # same lengths, same .idx: other tokens
    del shard
    with ShardWriter(prefix) as w:
        for d in docs:
            w.add_document(d)
    before = _snapshot(run)
    line = _one_line(*_train(capsys, run, data, "train.steps=3")[::2])
    assert f"data shard {prefix} changed (its .bin tokens differ" in line and "cannot resume" in line
    assert _snapshot(run) == before
    # a run dir whose fingerprint predates shard hashes: accepted with a note, and the hashes recorded for next time
    fp_path = os.path.join(older, "fingerprint.json")
    fp = json.load(open(fp_path))
    del fp["data.shards"]
    json.dump(fp, open(fp_path, "w"))
    rc, out, err = _train(capsys, older, data, "train.steps=3")
    assert rc == 0 and "predates shard content hashes" in out, err
    assert prefix in json.load(open(fp_path))["data.shards"]


# ------------------------------------------------------------------------------------------------ item 6: sources
@pytest.mark.parametrize("key", ["train.init_from_hf", "train.init_from"])
def test_start_from_an_hf_folder_with_another_tokenizer_is_refused(env, tmp_path, capsys, key):
    run = tmp_path / "ft"
    line = _one_line(*_train(capsys, run, env["other"], f"{key}={env['hf']}", "train.steps=0")[::2])
    assert f"{key}={env['hf']}" in line and os.path.join(env["hf"], "tokenizer.model") in line
    assert os.path.join(env["other"], "tokenizer.model") in line and "allow_tokenizer_change" in line
    assert not run.exists()
    rc, out, err = _train(capsys, run, env["other"], f"{key}={env['hf']}", "train.steps=0",
                          "train.allow_tokenizer_change=true")
    assert rc == 0 and "warning: " in out, err


def test_init_from_a_run_with_another_tokenizer_is_refused(env, tmp_path, capsys):
    run = tmp_path / "ft"
    line = _one_line(*_train(capsys, run, env["other"], f"train.init_from={env['run']}", "train.steps=0")[::2])
    assert os.path.join(env["run"], "tokenizer.model") in line and os.path.join(env["other"], "tokenizer.model") in line
    rc, out, err = _train(capsys, run, env["data"], f"train.init_from={env['run']}", "train.steps=0")
    assert rc == 0 and "warning" not in out, err  # the same tokenizer: no word about it


def test_an_hf_family_contradicting_model_family_is_refused(env, tmp_path, capsys):
    from llmforge.model.presets import PRESETS
    from llmforge.model.transformer import Transformer
    args = dataclasses.replace(PRESETS["tiny-gpt2"], vocab_size=300, max_seq_len=64)
    gpt2 = str(tmp_path / "gpt2")
    save_hf(args, Transformer(args).state_dict(), gpt2)
    for hf, family, other in ((gpt2, "llama", "gpt2"), (env["hf"], "gpt2", "llama")):
        line = _one_line(*_train(capsys, tmp_path / f"r-{family}", env["data"], f"train.init_from_hf={hf}",
                                 f"model.family={family}", "train.steps=0")[::2])
        assert f"train.init_from_hf={hf} is a {other} model but model.family={family}" in line


# ------------------------------------------------------------------------------------------------ poor case
def test_a_sidecar_under_reporting_max_token_id_is_refused_before_step_1(env, tmp_path, capsys):
    from data_pipeline.shards import ShardWriter
    data = shutil.copytree(env["data"], str(tmp_path / "data"))
    prefix = os.path.join(data, "shards", "train-00000")
    rng = np.random.default_rng(0)
    with ShardWriter(prefix) as w:
        for _ in range(40):  # every document holds an id past the 300-piece tokenizer: step 1 reads one
            w.add_document(np.append(rng.integers(4, 300, size=63), 300))
    stats = json.load(open(prefix + ".stats.json"))
    json.dump(dict(stats, max_token_id=299), open(prefix + ".stats.json", "w"))  # the sidecar says all is well
    line = _one_line(*_train(capsys, tmp_path / "run", data)[::2])
    assert f"{prefix} holds token id 300 (its .stats.json says 299)" in line and "vocab_size is 300" in line


def test_the_max_id_cache_never_hides_an_edit_in_place(env, tmp_path):
    from llmforge.core.config import ConfigError
    from llmforge.data.checks import check_data_against_model
    data = shutil.copytree(env["data"], str(tmp_path / "data"))
    check_data_against_model([data], 300)  # read and cached
    bin_path = os.path.join(data, "shards", "train-00000.bin")
    st = os.stat(bin_path)
    time.sleep(0.05)  # file times tick in kernel jiffies (up to 10 ms): an edit in the same tick keeps the ctime
    with open(bin_path, "r+b") as f:  # same size, same inode, mtime set back: only ctime tells
        f.write(np.array([300], dtype=np.uint16).tobytes())
    os.utime(bin_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ConfigError, match="holds token id 300"):
        check_data_against_model([data], 300)


def test_a_large_bin_is_hashed_by_fixed_windows(tmp_path):
    """Above SAMPLE_WINDOWS windows' worth of bytes only the windows are read: a change inside one shows."""
    from llmforge.train.run_guard import SAMPLE_WINDOW, SAMPLE_WINDOWS, _xxh3_file
    path = str(tmp_path / "big.bin")
    size = 3 * SAMPLE_WINDOWS * SAMPLE_WINDOW
    open(path, "wb").write(np.random.default_rng(0).bytes(size))
    first = _xxh3_file(path, SAMPLE_WINDOWS)
    assert first == _xxh3_file(path, SAMPLE_WINDOWS) != _xxh3_file(path)
    with open(path, "r+b") as f:
        f.seek(size - 10)  # inside the last window
        f.write(b"\x00" * 10)
    assert _xxh3_file(path, SAMPLE_WINDOWS) != first
