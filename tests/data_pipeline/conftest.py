"""Data-pipeline fixtures: synthetic corpora with planted duplicates, in-process and CLI pipeline runs."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI does: processes, not BLAS threads
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

from tests.data_pipeline.corpus import document, make_corpus, near_duplicate, write_jsonl  # noqa: E402,F401

BASE = ["tokenizer.vocab_size=320", "progress=false", "shards.valid_fraction=0.1"]


def make_dup_corpus(root: str, n_files: int = 4, docs_per_file: int = 30) -> dict:
    """Unique docs plus planted copies: an exact copy (different case/spacing) and a near duplicate of
    docs 0 and 1 of file 0, placed in other files. Returns the planted ids."""
    make_corpus(root, n_files=n_files, docs_per_file=docs_per_file)
    base0, base1 = document(0 * 100000 + 0), document(1)
    extra = [{"text": base0.upper().replace(". ", ".  ")},  # exact after normalisation
             {"text": near_duplicate(base1, 7)},  # near duplicate
             {"text": near_duplicate(base1, 8)}]  # another one: a cluster of 3
    write_jsonl(os.path.join(root, "zz-dups.jsonl.gz"), extra, "gz")
    return {"exact": "zz-dups.jsonl.gz:1", "near": ["zz-dups.jsonl.gz:2", "zz-dups.jsonl.gz:3"],
            "originals": ["part-0.jsonl:1", "part-0.jsonl:2"]}


@pytest.fixture(scope="session")
def dup_corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dupcorpus"))
    planted = make_dup_corpus(root)
    return root, planted


def run_inproc(corpus: str, out: str, *overrides: str):
    """Run the pipeline in this process (fork workers), returning run()'s result dict."""
    from data_pipeline import config, pipeline
    cfg = config.load(None, [f"input.paths=[{corpus}]", f"output_dir={out}", *BASE, *overrides])
    return pipeline.run(cfg)


@pytest.fixture(scope="session")
def pipeline_run(dup_corpus, tmp_path_factory):
    """One full run with 2 workers, shared by the read-only assertions."""
    corpus, planted = dup_corpus
    out = str(tmp_path_factory.mktemp("run") / "out")
    result = run_inproc(corpus, out, "workers=2")
    return out, result, planted


def cli(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, **kw)


def tree_hashes(root: str, skip=("work/timings",)) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest), minus run-time-only files."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if any(rel.startswith(s) for s in skip):
                continue
            out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def kept_ids(out: str) -> list[str]:
    ids = []
    for split in ("train", "valid"):
        folder = os.path.join(out, "doc_ids")
        for n in sorted(os.listdir(folder)):
            if n.startswith(split):
                ids += open(os.path.join(folder, n)).read().splitlines()
    return ids
