"""Issue 12, data pipeline: never lose the user's files or finished work, never silently reuse stale outputs.

Items: 1 (a failed run removes only what the pipeline wrote; a non-empty foreign folder is refused in one line),
4 (disk full keeps finished stages; the rerun resumes), 5 (input fingerprint = content, not size + mtime),
6 (a replaced tokenizer.model_path file is noticed), and the clear messages: output_dir under a regular file or
read-only, every document filtered out (table + one line), 0 documents with an existing tokenizer, a damaged .zst
in skip mode losing only the documents after the damage.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import subprocess
import tempfile

import pytest

from data_pipeline.__main__ import main
from tests.data_pipeline.corpus import make_corpus

FAST = ["progress=false", "workers=1", "tokenizer.vocab_size=300", "shards.valid_fraction=0.1", "steps=[clean,length]",
        "dedup.exact.enabled=false", "dedup.minhash.enabled=false"]
FINALS = ("shards", "doc_ids", "tokenizer.model", "stats.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    make_corpus(root, n_files=2, docs_per_file=25)
    return root


def run(corpus, out, *overrides, capsys=None):
    """The CLI in this process (workers=1: no fork, so monkeypatched stages apply): (exit status, captured)."""
    rc = main(["run", _cfg(), f"input.paths=[{corpus}]", f"output_dir={out}", *FAST, *overrides])
    return rc, (capsys.readouterr() if capsys else None)


def _cfg() -> str:
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("workers: 1\n")
    return path


def errors(cap) -> list[str]:
    return [ln for ln in cap.err.splitlines() if ln.startswith("error:")]


def finals(out) -> dict[str, bytes]:
    got = {}
    for name in FINALS:
        p = os.path.join(out, name)
        for root, _, files in (os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [name])]):
            for f in files:
                full = os.path.join(root, f)
                got[os.path.relpath(full, out)] = open(full, "rb").read()
    return got


# ----------------------------------------------------------------------------------- 1: ownership of output_dir
def _bad_utf8_input(tmp_path) -> str:
    inp = tmp_path / "bad"
    inp.mkdir(exist_ok=True)
    good = json.dumps({"text": "A fine sentence about the river and the city. " * 10})
    (inp / "x.jsonl").write_bytes((good + "\n").encode() * 3 + b'{"text": "caf\xe9"}\n')
    return str(inp)


def test_foreign_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own config\n")
    (out / "notes.txt").write_text("my notes\n")
    rc, cap = run(_bad_utf8_input(tmp_path), str(out), capsys=capsys)
    assert rc != 0 and len(errors(cap)) == 1, cap.err
    assert str(out) in errors(cap)[0] and "not empty" in errors(cap)[0]
    assert sorted(os.listdir(out)) == ["config.yaml", "notes.txt"]
    assert (out / "config.yaml").read_text() == "my own config\n" and (out / "notes.txt").read_text() == "my notes\n"


def test_a_failed_rerun_removes_only_what_the_pipeline_wrote(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(corpus, str(out), capsys=capsys)[0] == 0
    (out / "notes.txt").write_text("added by the user\n")
    rc, cap = run(_bad_utf8_input(tmp_path), str(out), capsys=capsys)  # another input: starts over, then fails
    assert rc != 0 and "UTF-8" in errors(cap)[0]
    # the user's file stays (and the ownership marker with it: the folder is still the pipeline's to reuse)
    assert sorted(os.listdir(out)) == [".llmforge-data", ".llmforge-data.lock", "notes.txt"]
    assert (out / "notes.txt").read_text() == "added by the user\n"
    os.remove(out / "notes.txt")
    rc, _ = run(_bad_utf8_input(tmp_path), str(out), capsys=capsys)
    assert rc != 0 and not out.exists(), "a folder the pipeline created and that holds nothing else is removed"


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_holder(corpus, tmp_path, capsys):
    import fcntl
    out = tmp_path / "out"
    assert run(corpus, str(out), capsys=capsys)[0] == 0
    before = finals(out)
    fd = os.open(out / ".llmforge-data.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
    try:
        rc, cap = run(corpus, str(out), "tokenizer.vocab_size=320", capsys=capsys)  # would start over
        assert rc == 1 and len(errors(cap)) == 1 and "in use by another pipeline run" in errors(cap)[0], cap.err
        assert f"pid {os.getpid()}" in errors(cap)[0]
        assert finals(out) == before, "the refused run touched the outputs"
    finally:
        os.close(fd)  # the holder ends (a crash releases the lock the same way)
    assert run(corpus, str(out), capsys=capsys)[0] == 0


# ----------------------------------------------------------------------------------- 4: disk full mid-pipeline
def test_disk_full_keeps_finished_stages_and_the_rerun_resumes(corpus, tmp_path, capsys, monkeypatch):
    import data_pipeline.pipeline as pl
    ref = tmp_path / "ref"
    assert run(corpus, str(ref), capsys=capsys)[0] == 0
    out = tmp_path / "out"
    real = pl.tokenize_task

    def full(ctx, rank):  # what a full disk does to the stage's first write
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(ctx.work, "tokens", "train-00000.bin"))
    monkeypatch.setattr(pl, "tokenize_task", full)
    rc, cap = run(corpus, str(out), capsys=capsys)
    assert rc == 1 and len(errors(cap)) == 1 and "disk full" in errors(cap)[0], cap.err
    markers = out / "work" / "markers"
    done = sorted(os.listdir(markers))
    assert "prepare" in done and "tokenizer" in done and "tokenize" not in done
    prepared = {p: os.stat(markers / "prepare" / p).st_mtime_ns for p in os.listdir(markers / "prepare")}
    monkeypatch.setattr(pl, "tokenize_task", real)  # space freed
    rc, cap = run(corpus, str(out), capsys=capsys)
    assert rc == 0, cap.err
    assert {p: os.stat(markers / "prepare" / p).st_mtime_ns for p in os.listdir(markers / "prepare")} == prepared
    assert finals(out) == finals(ref)  # resumed output is byte-identical to an uninterrupted run


def _can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_real_enospc_on_a_small_tmpfs(corpus, tmp_path, capsys, monkeypatch):
    """The same with a real file system running full (a tmpfs, when this test may mount one): the disk is filled
    up just before the tokenize stage, freed, and the rerun finishes."""
    import data_pipeline.pipeline as pl
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root to mount a tmpfs")
    try:
        out, filler, real = mnt / "out", mnt / "filler", pl.tokenize_task

        def fill_then_tokenize(ctx, rank):
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError:
                    pass
            return real(ctx, rank)
        monkeypatch.setattr(pl, "tokenize_task", fill_then_tokenize)
        rc, cap = run(corpus, str(out), capsys=capsys)
        assert rc == 1 and "disk full" in errors(cap)[0], cap.err
        assert os.path.isdir(out / "work" / "markers" / "prepare")
        os.remove(filler)
        monkeypatch.setattr(pl, "tokenize_task", real)
        rc, cap = run(corpus, str(out), capsys=capsys)
        assert rc == 0, cap.err
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------------- 5, 6: fingerprints
def test_input_changed_with_same_size_and_mtime_is_reprocessed(corpus, tmp_path, capsys):
    inp = shutil.copytree(corpus, str(tmp_path / "in"))
    out = str(tmp_path / "out")
    assert run(inp, out, capsys=capsys)[0] == 0
    before = finals(out)
    assert run(inp, out, capsys=capsys)[0] == 0 and finals(out) == before  # unchanged: a no-op
    victim = os.path.join(inp, sorted(os.listdir(inp))[0])
    st = os.stat(victim)
    data = open(victim, "rb").read()
    assert b"river" in data
    with open(victim, "r+b") as f:  # same size, in place (same inode), then the old mtime put back
        f.write(data.replace(b"river", b"rover"))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_size == st.st_size and os.stat(victim).st_mtime_ns == st.st_mtime_ns
    rc, cap = run(inp, out, capsys=capsys)
    assert rc == 0 and "starting over" in cap.out
    assert finals(out) != before


def _sp_model(path, words: str) -> str:
    import sentencepiece as spm
    buf = io.BytesIO()
    rng = random.Random(0)
    lines = [" ".join(rng.sample(words.split(), 5)) for _ in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=60, model_type="bpe",
                                   minloglevel=2, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


def test_replaced_tokenizer_file_is_noticed(corpus, tmp_path, capsys):
    tok = str(tmp_path / "tok.model")
    _sp_model(tok, "the river city garden teacher window market mountain doctor village letter engine forest")
    out = str(tmp_path / "out")
    assert run(corpus, out, f"tokenizer.model_path={tok}", capsys=capsys)[0] == 0
    first = open(os.path.join(out, "tokenizer.model"), "rb").read()
    assert first == open(tok, "rb").read()
    _sp_model(tok, "a people have seen the bridge museum farmer island library painter harbor valley soldier")
    assert open(tok, "rb").read() != first
    rc, cap = run(corpus, out, f"tokenizer.model_path={tok}", capsys=capsys)
    assert rc == 0 and "starting over" in cap.out
    assert open(os.path.join(out, "tokenizer.model"), "rb").read() == open(tok, "rb").read()


# ----------------------------------------------------------------------------------- clear messages
def test_output_dir_under_a_regular_file_is_one_line(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    rc, cap = run(corpus, str(out), capsys=capsys)
    assert rc == 1 and len(errors(cap)) == 1 and str(out) in errors(cap)[0] and "regular file" in errors(cap)[0]


def test_read_only_output_dir_is_one_line(corpus, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: a read-only mount instead
        if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                                       capture_output=True).returncode:
            pytest.skip("root without mount")
    else:
        ro.chmod(0o555)
    try:
        rc, cap = run(corpus, str(ro / "out"), capsys=capsys)
        assert rc == 1 and len(errors(cap)) == 1 and "cannot write" in errors(cap)[0], cap.err
        assert "Traceback" not in cap.err
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True) if os.geteuid() == 0 else ro.chmod(0o755)


def test_every_document_filtered_out_shows_the_table_then_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    rc, cap = run(corpus, str(out), "length.min_chars=1000000", capsys=capsys)
    assert rc == 1 and len(errors(cap)) == 1, cap.err
    assert "no documents left" in errors(cap)[0] and "length" in errors(cap)[0]
    table = [ln for ln in cap.out.splitlines() if ln.startswith(("clean", "length"))]
    assert len(table) == 2 and "50 -> 0" in table[1] and "min_chars=50" in table[1], cap.out
    assert not out.exists()


def test_zero_documents_with_an_existing_tokenizer_is_an_error(corpus, tmp_path, capsys):
    tok = _sp_model(tmp_path / "tok.model", "the river city garden teacher window market mountain doctor village")
    rc, cap = run(corpus, str(tmp_path / "out"), f"tokenizer.model_path={tok}", "length.min_chars=1000000",
                  capsys=capsys)
    assert rc == 1 and "no documents left" in errors(cap)[0], cap.err


def test_damaged_zst_in_skip_mode_loses_only_what_follows_the_damage(tmp_path):
    from collections import Counter

    import zstandard
    from data_pipeline.config import InputConfig
    from data_pipeline.readers import Reader
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines = "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 300)))}) + "\n"
                    for _ in range(2500)).encode()
    z = zstandard.ZstdCompressor(level=3).compress(lines)
    mid = len(z) // 2
    assert mid < 1 << 20  # the damage sits inside the first 1 MiB read: once, everything read with it was lost
    d = zstandard.ZstdDecompressor().decompressobj()
    intact = b"".join(d.decompress(z[i:min(i + 4096, mid - 4096)]) for i in range(0, mid - 4096, 4096))
    expected_at_least = intact.count(b"\n")  # complete lines decodable from the bytes before the damaged part
    path = str(tmp_path / "x.jsonl.zst")
    for name, data in (("zeroed", z[:mid] + b"\0" * 4096 + z[mid + 4096:]), ("truncated", z[:mid])):
        with open(path, "wb") as f:
            f.write(data)
        stats = Counter()
        docs = list(Reader(InputConfig(paths=[path], on_error="skip"), stats).read("jsonl", path, "x"))
        assert expected_at_least > 1000 and len(docs) >= expected_at_least, name
        assert stats["read_errors"] == 1 and len(docs) < 2500


# ----------------------------------------------------------------------------------- 13: the langid cache
class _Payload:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def test_a_planted_langid_cache_never_runs_code(tmp_path, monkeypatch, capsys):
    import pickle

    import numpy as np
    from langid.langid import LanguageIdentifier

    from data_pipeline.filters import lang
    monkeypatch.setenv("LLMFORGE_CACHE", str(tmp_path))
    mark = tmp_path / "pwned"
    cache = lang._cache_file()
    for planted in (cache, cache[: -len(".npz")] + ".pkl"):  # the cache, and where a pickle cache used to live
        with open(planted, "wb") as f:
            pickle.dump((_Payload(mark),) * 6, f)
    np.savez(cache, nb_ptc=np.array([_Payload(mark)], dtype=object))  # an .npz whose array is a pickle
    rebuilt = object()
    monkeypatch.setattr(LanguageIdentifier, "from_modelstring", classmethod(lambda cls, *a, **k: rebuilt))
    monkeypatch.setattr(lang, "_save", lambda ident, path: None)
    monkeypatch.setattr(lang, "_IDENTIFIER", None)
    assert lang.identifier() is rebuilt
    assert not mark.exists(), "the planted cache ran code"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and cache in err


# ----------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_stops_the_run_and_its_workers_and_the_rerun_resumes(tmp_path, capsys):
    import glob
    import signal
    import sys
    import time

    from tests.conftest import ROOT
    corpus = str(tmp_path / "corpus")
    make_corpus(corpus, n_files=8, docs_per_file=150)
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "data_pipeline", "run", _cfg(), f"input.paths=[{corpus}]", f"output_dir={out}",
            *FAST, "workers=2", "tasks=8"]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not glob.glob(os.path.join(out, "work", "markers", "prepare", "*.json")) and time.time() - t0 < 120:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)  # the parent only, as a scheduler's first signal
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "rerun" in lines[0] and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "stats.json")), "the signal came after the run finished"
    time.sleep(1)
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"workers outlived the run: {left}"
    rc, cap = run(corpus, out, "workers=2", "tasks=8", capsys=capsys)
    assert rc == 0, cap.err
