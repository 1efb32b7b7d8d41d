"""kill -9 the data pipeline (the whole process group: parent and fork workers) at random moments and at the
start of different stages, rerun the same command: every output file is byte-identical (sha256) to an
uninterrupted run, and no temp file is left. Complements tests/data_pipeline/test_resume.py (kills at the
first marker of prepare/tokenize) with time-random kills, the later stages, and a kill during the resume.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

from tests.data_pipeline.corpus import make_corpus  # noqa: E402

pytestmark = pytest.mark.slow
OVERRIDES = ["workers=2", "tasks=4", "tokenizer.vocab_size=320", "progress=false", "shards.valid_fraction=0.1"]


def _args(corpus, out):
    cfg = os.path.join(os.path.dirname(out), "pipeline.yaml")
    if not os.path.exists(cfg):
        with open(cfg, "w") as f:
            f.write(f"input:\n  paths: [{corpus}]\n")
    return [sys.executable, "-m", "data_pipeline", "run", cfg, f"output_dir={out}", *OVERRIDES]


def _start(corpus, out):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(_args(corpus, out), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(corpus, out):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(_args(corpus, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the parent and its forked workers
    except ProcessLookupError:
        pass
    proc.wait()


def _hashes(out):
    """sha256 of every file under out, except run-time-only timings (work/ included: it must resume cleanly)."""
    res = {}
    for d, _, names in os.walk(out):
        for n in names:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, out)
            if rel.startswith(os.path.join("work", "timings")):
                continue
            with open(p, "rb") as f:
                res[rel] = hashlib.sha256(f.read()).hexdigest()
    return res


def _final(h):
    return {k: v for k, v in h.items() if not k.startswith("work" + os.sep)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-kill")
    corpus = make_corpus(str(root / "corpus"), n_files=4, docs_per_file=25)
    corpus = str(root / "corpus") if corpus is None else corpus
    out = str(root / "run" / "out")  # one path for every run: config.yaml records output_dir
    os.makedirs(os.path.dirname(out))
    t0 = time.perf_counter()
    _run(corpus, out)
    wall = time.perf_counter() - t0
    ref = _hashes(out)
    assert any(k.startswith("shards") for k in ref) and "stats.json" in ref and "tokenizer.model" in ref
    shutil.rmtree(out)
    return corpus, out, ref, wall


def _kill_at(proc, out, rel_pattern, timeout=300):
    """SIGKILL as soon as a path matching ``rel_pattern`` (relative to out) exists."""
    pattern = os.path.join(out, rel_pattern)
    t0 = time.time()
    while not glob.glob(pattern) and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.005)
    _kill(proc)


def _kill_after(proc, seconds):
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < seconds:
        time.sleep(0.005)
    _kill(proc)


# ("at", pattern): kill when it appears — a stage's first done marker, or the shard stage's temp folder (a kill
# in the middle of writing the final shards; on a fast machine it can come too late, which the rerun tolerates).
TRIALS = [("random", 0), ("random", 1), ("at", "work/markers/buckets/*.json"), ("at", "work/markers/tokenizer/*.json"),
          ("at", "shards.tmp*"), ("twice", 2)]


@pytest.mark.parametrize("kind,arg", TRIALS, ids=["random-0", "random-1", "at-buckets", "at-tokenizer", "in-shard-write", "twice-2"])
def test_sigkill_then_rerun_is_byte_identical(setup, kind, arg):
    corpus, out, ref, wall = setup
    shutil.rmtree(out, ignore_errors=True)
    try:
        if kind == "at":
            _kill_at(_start(corpus, out), out, arg)
        else:
            rng = random.Random(arg)
            _kill_after(_start(corpus, out), rng.uniform(0.2, 0.9) * wall)
            if kind == "twice":  # killed again while resuming
                _kill_after(_start(corpus, out), rng.uniform(0.2, 0.6) * wall)
        killed_early = not os.path.exists(os.path.join(out, "stats.json"))
        _run(corpus, out)
        got = _hashes(out)
        assert _final(got) == _final(ref), "final outputs differ from the uninterrupted run"
        assert got == ref, "work/ differs from the uninterrupted run"
        leftovers = glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)
        assert not leftovers, f"temp files left behind: {leftovers}"
        if kind == "at" and arg.startswith("work/markers"):
            assert killed_early, f"the kill at {arg} came after the run had finished"
    finally:
        shutil.rmtree(out, ignore_errors=True)
