"""Reliability: SIGKILL of the whole process group at different stages, then a rerun, gives byte-identical
outputs to an uninterrupted run; a finished run reruns as a no-op; a changed config starts over."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.data_pipeline.conftest import BASE, ROOT, run_inproc, tree_hashes

SKIP = ("work/timings", "config.yaml", "work/config.yaml")  # run-time only / records output_dir


@pytest.fixture(scope="module")
def reference(dup_corpus, tmp_path_factory):
    corpus, _ = dup_corpus
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_inproc(corpus, out, "workers=2", "tasks=4")
    return out


def _start(corpus, out):
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "data_pipeline", "run", _cfg(out), f"input.paths=[{corpus}]", f"output_dir={out}",
            "workers=2", "tasks=4", *BASE]
    return subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _cfg(out):
    path = out + ".yaml"
    with open(path, "w") as f:
        f.write("workers: 2\n")
    return path


def _kill_when(proc, pattern, timeout=240):
    """SIGKILL the run's process group as soon as a file matching pattern exists."""
    t0 = time.time()
    while not glob.glob(pattern):
        if proc.poll() is not None:
            pytest.fail(f"run ended before reaching {pattern}: {proc.stderr.read().decode()[-500:]}")
        if time.time() - t0 > timeout:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_without_the_word_cache_every_byte_is_the_same(dup_corpus, reference, tmp_path):
    corpus, _ = dup_corpus
    out = str(tmp_path / "out")
    run_inproc(corpus, out, "workers=2", "tasks=4", "tokenizer.encode_cache_words=0")
    assert tree_hashes(out, SKIP) == tree_hashes(reference, SKIP)


@pytest.mark.parametrize("stage", ["prepare", "tokenize"])
def test_sigkill_then_rerun_is_byte_identical(stage, dup_corpus, reference, tmp_path):
    corpus, _ = dup_corpus
    out = str(tmp_path / "out")
    proc = _start(corpus, out)
    _kill_when(proc, os.path.join(out, "work", "markers", stage, "*.json"))
    assert not os.path.exists(os.path.join(out, "stats.json")), "the kill came after the run finished"
    run_inproc(corpus, out, "workers=2", "tasks=4")
    assert tree_hashes(out, SKIP) == tree_hashes(reference, SKIP)
    assert not [p for p in glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)]


def test_finished_run_reruns_as_noop_and_changed_config_restarts(dup_corpus, tmp_path):
    corpus, _ = dup_corpus
    out = str(tmp_path / "out")
    first = run_inproc(corpus, out, "workers=1")
    before = tree_hashes(out, SKIP)
    again = run_inproc(corpus, out, "workers=2", "keep_work_files=false", "tokenizer.encode_cache_words=0")
    assert sum(again["task_seconds"].values()) == sum(first["task_seconds"].values())  # no task ran again
    assert tree_hashes(out, SKIP) == {k: v for k, v in before.items()
                                      if not k.startswith(("work/prepared", "work/signatures", "work/dedup", "work/tokens"))}
    assert not os.path.exists(os.path.join(out, "work", "prepared"))
    assert run_inproc(corpus, out, "workers=1")["stats"] == first["stats"]  # still a no-op without the bulk
    changed = run_inproc(corpus, out, "workers=1", "shards.valid_fraction=0.5")
    n_valid = changed["stats"]["output"]["valid"]["docs"]
    assert n_valid > 3 * first["stats"]["output"]["valid"]["docs"] and n_valid > 30  # redone with the new split
