"""A catalogue of bad inputs for every CLI: each must fail with exactly ONE clear ``error: ...`` line that names
the file / line / key / rank at fault, a non-zero exit, no traceback, and no partial output left behind.

Data-driven: every case is a row of CASES (id, CLI, how to build the bad input, the words the error line must
contain). Cases that fail because of a known bug elsewhere are marked xfail(strict=True) with the bug named.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.conftest import ROOT, run_cli, train_cmd, write_synthetic_shards

PY = sys.executable
DATA_CLI = [PY, "-m", "data_pipeline", "run"]
EVAL_CLI = [PY, "-m", "llmforge.eval"]
TINY = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
GOOD_TEXT = ("The quick brown fox jumps over the lazy dog and then runs back to the farm. " * 8).strip()
# every env var a launcher may set: cleared for each case so the outer environment cannot leak in
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_NODELIST", "LLMFORGE_FAULT", "LLMFORGE_DEBUG")


@dataclass
class Case:
    id: str
    cli: str                                   # data | train | eval
    build: Callable                            # build(tmp, shared) -> dict(args=[...], env={}, out=path)
    expect: tuple                              # substrings the single error line must contain
    xfail: str = ""                            # reason (a real bug elsewhere), strict
    marks: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- helpers
def w(path, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def jl(*recs) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


def good_lines(n=3) -> str:
    return jl(*[{"text": GOOD_TEXT + f" Doc {i}."} for i in range(n)])


def data_run(tmp, input_path, *overrides, config=None):
    """A pipeline run on ``input_path`` writing to tmp/out (which must not exist afterwards)."""
    out = os.path.join(tmp, "out")
    cfg = config or w(os.path.join(tmp, "data.yaml"), f"output_dir: {out}\nworkers: 1\nprogress: false\n"
                                                     f"input:\n  paths: [{input_path}]\n")
    return {"args": DATA_CLI + [cfg, *overrides], "out": out}


def data_file(name, content, *overrides):
    def build(tmp, shared):
        path = w(os.path.join(tmp, "in", name), content)
        return data_run(tmp, path, *overrides)
    return build


def data_cfg(yaml_text, *overrides, input_dir=True):
    """A pipeline run with a custom config text ({input} and {out} are filled in)."""
    def build(tmp, shared):
        inp = os.path.join(tmp, "in")
        w(os.path.join(inp, "ok.jsonl"), good_lines())
        out = os.path.join(tmp, "out")
        cfg = w(os.path.join(tmp, "data.yaml"), yaml_text.format(input=inp, out=out))
        return {"args": DATA_CLI + [cfg, *overrides], "out": out}
    return build


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def zst(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def parquet_bytes(**cols) -> bytes:
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def train_run(*overrides, env=None, config=TINY):
    def build(tmp, shared):
        run_dir = os.path.join(tmp, "run")
        args = train_cmd() + [config if config != "__tmp__" else os.path.join(tmp, "train.yaml"),
                              f"data.paths=[{shared['synth']}]", f"run_dir={run_dir}", "model.vocab_size=64",
                              "train.steps=2", "data.seq_len=64", *overrides]
        return {"args": args, "env": env or {}, "out": run_dir}
    return build


def train_cfg_file(text, *overrides):
    def build(tmp, shared):
        w(os.path.join(tmp, "train.yaml"), text)
        return train_run(*overrides, config="__tmp__")(tmp, shared)
    return build


def eval_run(mutate=None, run_dir_fn=None, extra=()):
    """Eval on a copy of the shared trained run, after ``mutate(run_dir)``."""
    def build(tmp, shared):
        if run_dir_fn:
            run_dir = run_dir_fn(tmp, shared)
        else:
            run_dir = os.path.join(tmp, "run")
            shutil.copytree(shared["run"], run_dir)
            if mutate:
                mutate(run_dir)
        return {"args": EVAL_CLI + [run_dir, *extra], "out": os.path.join(run_dir, "eval.json")}
    return build


def ckpt_dir(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return os.path.join(root, sorted(d for d in os.listdir(root) if d.startswith("step_"))[-1])


def _distcp(run_dir):
    d = ckpt_dir(run_dir)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".distcp")]


def truncate_shard(run_dir):
    for f in _distcp(run_dir):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def garble_shard_same_size(run_dir):  # the COMPLETE marker's sizes still match: its content hashes do not
    for f in _distcp(run_dir):
        n = os.path.getsize(f)
        with open(f, "wb") as fh:
            fh.write(b"\x5a" * n)


def drop_marker(run_dir):
    os.remove(os.path.join(ckpt_dir(run_dir), "COMPLETE"))


def drop_metadata(run_dir):  # sizes in COMPLETE then mismatch (".metadata missing")
    os.remove(os.path.join(ckpt_dir(run_dir), ".metadata"))


def drop_all_checkpoints(run_dir):
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))


def drop_config(run_dir):
    os.remove(os.path.join(run_dir, "config.yaml"))


def break_config_yaml(run_dir):
    w(os.path.join(run_dir, "config.yaml"), "model:\n  preset: tiny\n   bad: [\n")


def _resume_corrupt(tmp, shared):
    run_dir = os.path.join(tmp, "run")
    shutil.copytree(shared["run"], run_dir)
    garble_shard_same_size(run_dir)
    args = train_cmd() + [TINY, f"data.paths=[{shared['synth']}]", f"run_dir={run_dir}", "model.vocab_size=64",
                          "train.steps=4", "data.seq_len=64", "train.eval_batches=1"]
    return {"args": args, "out": None}


# ------------------------------------------------------------------------------------------------- catalogue
CASES = [
    # ---- data: records
    Case("data-invalid-utf8", "data", data_file("bad.jsonl", good_lines(2).encode() + b'{"text": "caf\xe9 ok"}\n'),
         ("bad.jsonl:3", "UTF-8")),
    Case("data-broken-json-line", "data", data_file("bad.jsonl", good_lines(1) + '{"text": "unterminated\n' + good_lines(1)),
         ("bad.jsonl:2", "JSON")),
    Case("data-missing-text-field", "data", data_file("bad.jsonl", good_lines(1) + jl({"body": GOOD_TEXT})),
         ("bad.jsonl:2", "text", "input.text_key")),
    Case("data-text-not-string", "data", data_file("bad.jsonl", jl({"text": 42}) + good_lines(1)),
         ("bad.jsonl:1", "text")),
    Case("data-line-not-object", "data", data_file("bad.jsonl", good_lines(2) + "[1, 2, 3]\n"),
         ("bad.jsonl:3", "JSON object")),
    Case("data-custom-text-key-missing", "data", data_file("bad.jsonl", good_lines(2), "input.text_key=content"),
         ("bad.jsonl:1", "content")),
    Case("data-doc-too-long", "data", data_file("big.jsonl", good_lines(1) + jl({"text": "word " * 3000}),
                                                "input.max_doc_chars=10000"),
         ("big.jsonl:2", "input.max_doc_chars")),
    # ---- data: compressed / binary files
    Case("data-truncated-gz", "data", data_file("cut.jsonl.gz", gz(good_lines(200).encode())[:600]),
         ("cut.jsonl.gz", "truncated")),
    Case("data-truncated-zst", "data", data_file("cut.jsonl.zst", zst(good_lines(200).encode())[:300]),
         ("cut.jsonl.zst", "truncated")),
    Case("data-gz-not-gzip", "data", data_file("fake.jsonl.gz", b"this is not gzip at all\n" * 4),
         ("fake.jsonl.gz",)),
    Case("data-zst-not-zstd", "data", data_file("fake.jsonl.zst", b"this is not zstd at all\n" * 4),
         ("fake.jsonl.zst",)),
    Case("data-unreadable-parquet", "data", data_file("bad.parquet", b"PAR1 definitely not parquet"),
         ("bad.parquet", "parquet")),
    Case("data-parquet-missing-column", "data", lambda tmp, s: data_file(
        "nocol.parquet", parquet_bytes(body=[GOOD_TEXT, GOOD_TEXT]))(tmp, s), ("nocol.parquet", "text")),
    Case("data-txt-invalid-utf8", "data", data_file("page.txt", b"Good line one.\nSecond line \xff\xfe here.\n"),
         ("page.txt:2", "UTF-8")),
    # ---- data: paths
    Case("data-empty-input-dir", "data", lambda tmp, s: data_run(tmp, os.makedirs(os.path.join(tmp, "empty"))
                                                                   or os.path.join(tmp, "empty")),
         ("input.paths", "no readable files")),
    Case("data-missing-input-path", "data", lambda tmp, s: data_run(tmp, os.path.join(tmp, "nope")),
         ("input.paths", "nope")),
    Case("data-glob-matches-nothing", "data", lambda tmp, s: data_run(tmp, os.path.join(tmp, "*.jsonl")),
         ("input.paths", "matches nothing")),
    # ---- data: config
    Case("data-config-missing-file", "data", lambda tmp, s: {"args": DATA_CLI + [os.path.join(tmp, "missing.yaml")],
                                                             "out": os.path.join(tmp, "out")},
         ("missing.yaml", "not found")),
    Case("data-config-invalid-yaml", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}\n  text_key: x\n"),
         ("data.yaml", "line", "YAML")),
    Case("data-config-unknown-key", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}]\n",
                                                     "tokenizer.vocab_sise=512"),
         ("tokenizer.vocab_sise", "vocab_size")),
    Case("data-config-wrong-type", "data", data_cfg("output_dir: {out}\nworkers: two\ninput:\n  paths: [{input}]\n"),
         ("workers",)),
    Case("data-config-bad-enum", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}]\n", "executor=cloud"),
         ("executor", "cloud")),
    Case("data-config-bad-step-name", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}]\n",
                                                       "steps=[clean,gopher]"),
         ("steps", "gopher")),
    Case("data-config-vocab-too-small", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}]\n",
                                                         "tokenizer.vocab_size=100"),
         ("tokenizer.vocab_size",)),
    Case("data-config-tokenizer-model-missing", "data",
         data_cfg("output_dir: {out}\nworkers: 1\nprogress: false\ninput:\n  paths: [{input}]\n"
                  "length:\n  min_chars: 10\nc4:\n  enabled: false\nfineweb:\n  enabled: false\n"
                  "gopher_quality:\n  enabled: false\ngopher_repetition:\n  enabled: false\nlang:\n  enabled: false\n",
                  "tokenizer.model_path=/nonexistent/tok.model"),
         ("tokenizer.model_path", "/nonexistent/tok.model")),
    Case("data-override-not-key-value", "data", data_cfg("output_dir: {out}\ninput:\n  paths: [{input}]\n", "workers"),
         ("workers", "key=value")),
    # ---- train: config
    Case("train-unknown-key", "train", train_run("train.stepz=3"), ("train.stepz", "train.steps")),
    Case("train-unknown-section", "train", train_run("optimiser.lr=1"), ("optimiser",)),
    Case("train-wrong-type", "train", train_run("train.steps=many"), ("train.steps",)),
    Case("train-missing-config", "train", lambda tmp, s: {"args": train_cmd() + [os.path.join(tmp, "nope.yaml")],
                                                          "out": os.path.join(tmp, "run")},
         ("nope.yaml",)),
    Case("train-invalid-yaml", "train", train_cfg_file("model:\n  preset: tiny\ntrain: [steps: 3\n"),
         ("train.yaml", "line", "YAML")),
    Case("train-yaml-not-mapping", "train", train_cfg_file("- just\n- a list\n"), ("train.yaml", "mapping")),
    Case("train-bad-enum-schedule", "train", train_run("train.schedule=linear"), ("train.schedule", "linear")),
    Case("train-bad-enum-dtype", "train", train_run("train.dtype=fp8"), ("train.dtype", "fp8")),
    Case("train-bad-zero-stage", "train", train_run("parallel.zero_stage=4"), ("parallel.zero_stage",)),
    Case("train-unknown-preset", "train", train_run("model.preset=gpt5"), ("model.preset", "gpt5")),
    Case("train-world-size-mismatch", "train", train_run("parallel.tp=2", "parallel.dp_replicate=2",
                                                         env={"RANK": "0", "WORLD_SIZE": "2"}),
         ("world size 2", "parallel")),
    Case("train-tp-not-dividing-heads", "train", train_run("parallel.tp=3", env={"RANK": "0", "WORLD_SIZE": "3"}),
         ("parallel.tp=3", "n_heads")),
    Case("train-pp-exceeds-layers", "train", train_run("parallel.pp=3", "model.tie_embeddings=false",
                                                       env={"RANK": "0", "WORLD_SIZE": "3"}),
         ("parallel.pp=3", "n_layers")),
    Case("train-micro-not-dividing-batch", "train", train_run("train.global_batch_size=8", "train.micro_batch_size=3"),
         ("train.micro_batch_size=3",)),
    Case("train-batch-not-divisible-by-dp", "train", train_run("train.global_batch_size=9",
                                                               env={"RANK": "0", "WORLD_SIZE": "2"}),
         ("train.global_batch_size=9", "2")),
    Case("train-grad-accum-mismatch", "train", train_run("train.micro_batch_size=2", "train.grad_accum_steps=3"),
         ("train.grad_accum_steps=3",)),
    Case("train-seq-len-too-long", "train", train_run("data.seq_len=4096"), ("data.seq_len=4096", "max_seq_len")),
    Case("train-dp-shard-without-fsdp", "train", train_run("parallel.dp_shard=2"), ("parallel.dp_shard",)),
    Case("train-missing-data-path", "train", lambda tmp, s: train_run(f"data.paths=[{tmp}/no-such-data]")(tmp, s),
         ("no-such-data",)),
    Case("train-weights-count-mismatch", "train", train_run("data.weights=[0.5,0.5]"), ("data.weights",)),
    Case("train-override-not-key-value", "train", train_run("train.steps"), ("train.steps", "key=value")),
    # ---- launch
    Case("launch-rank-without-world-size", "train", train_run(env={"RANK": "0"}), ("RANK", "WORLD_SIZE")),
    Case("launch-world-size-without-rank", "train", train_run(env={"WORLD_SIZE": "1"}), ("RANK", "WORLD_SIZE")),
    Case("launch-slurm-procid-without-ntasks", "train", train_run(env={"SLURM_PROCID": "0"}),
         ("SLURM_NTASKS", "SLURM_PROCID")),
    Case("launch-slurm-without-master-addr", "train", train_run(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                                                                      "SLURM_LOCALID": "0"}),
         ("MASTER_ADDR",)),
    Case("launch-device-cuda-without-gpu", "train", train_run("dist.device=cuda"), ("dist.device=cuda", "CUDA")),
    # ---- checkpoints / eval
    Case("eval-run-dir-missing", "eval", eval_run(run_dir_fn=lambda tmp, s: os.path.join(tmp, "no-run")),
         ("no-run", "not found")),
    Case("eval-no-config", "eval", eval_run(drop_config), ("config.yaml",)),
    Case("eval-broken-config", "eval", eval_run(break_config_yaml), ("config.yaml", "line")),
    Case("eval-no-checkpoints", "eval", eval_run(drop_all_checkpoints), ("no complete checkpoint", "checkpoints")),
    Case("eval-missing-marker", "eval", eval_run(drop_marker), ("no complete checkpoint",)),
    Case("eval-truncated-shard", "eval", eval_run(truncate_shard), ("no complete checkpoint",)),
    Case("eval-missing-metadata", "eval", eval_run(drop_metadata), ("no complete checkpoint",)),
    Case("eval-corrupt-shard-same-size", "eval", eval_run(garble_shard_same_size), ("step_", "damaged")),
    Case("train-resume-corrupt-checkpoint", "train", lambda tmp, s: _resume_corrupt(tmp, s), ("step_", "cannot resume")),
    Case("eval-bad-override", "eval", eval_run(extra=["train.stepz=1"]), ("train.stepz",)),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Synthetic shards and one tiny trained run (2 steps) to break in the checkpoint cases."""
    root = tmp_path_factory.mktemp("bad-inputs")
    synth = write_synthetic_shards(str(root / "synth"), n_train=40, n_valid=6)
    run = str(root / "run")
    p = run_cli(train_cmd() + [TINY, f"data.paths=[{synth}]", f"run_dir={run}", "model.vocab_size=64",
                               "train.steps=2", "data.seq_len=64", "train.eval_batches=1"], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return {"synth": synth, "run": run}


def _params():
    out = []
    for c in CASES:
        marks = list(c.marks) + ([pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.cli for c in CASES} == {"data", "train", "eval"}


def _run_case(case: Case, tmp: str, shared: dict):
    spec = case.build(tmp, shared)
    return spec, run_cli(spec["args"], timeout=240, env=spec.get("env", {}))


@pytest.fixture(scope="module")
def results(request, shared, tmp_path_factory):
    """Run every selected case once, CONCURRENCY at a time (each is a fresh interpreter that mostly imports),
    so the catalogue costs minutes, not one interpreter start after another."""
    from concurrent.futures import ThreadPoolExecutor
    selected = [it.callspec.params["case"] for it in request.session.items
                if getattr(it, "callspec", None) and "case" in it.callspec.params
                and it.module is request.module]
    # run_cli merges os.environ: launch variables of the outer environment must not leak into the cases
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            futs = {c.id: pool.submit(_run_case, c, str(tmp_path_factory.mktemp(c.id)), shared) for c in selected}
            return {k: f.result() for k, f in futs.items()}
    finally:
        os.environ.update(saved)


CONCURRENCY = int(os.environ.get("LLMFORGE_TEST_CONCURRENCY", "3"))


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, results):
    spec, p = results[case.id]
    err = p.stderr
    msg = f"\n--- exit {p.returncode}\n--- stderr:\n{err[-3000:]}\n--- stdout:\n{p.stdout[-1000:]}"
    assert p.returncode != 0, "expected a failure" + msg
    assert "Traceback" not in err and "Traceback" not in p.stdout, "traceback printed" + msg
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, got {len(errors)}" + msg
    line = errors[0]
    missing = [s for s in case.expect if s.lower() not in line.lower()]
    assert not missing, f"error line does not name {missing}: {line!r}" + msg
    out = spec.get("out")
    if out:
        assert not os.path.exists(out), f"partial output left behind: {out} ({os.listdir(out) if os.path.isdir(out) else 'file'})"
