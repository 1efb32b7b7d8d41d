"""executor=ray against a real Ray cluster that this test starts (`ray start --head`) and stops: the same shards,
markers and stats as the local executor byte for byte, done markers honoured on a rerun, and a bad input
reported in one line."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from tests.data_pipeline.conftest import BASE, ROOT, cli, tree_hashes

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SKIP = ("work/timings", "config.yaml", "work/config.yaml")  # run-time only / records executor and output_dir


def _ray_cli() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else shutil.which("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    start = [_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--object-store-memory=200000000",  # tasks pass only small objects: keep memory free
             f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        p = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def _run_ray(corpus: str, out: str, address: str, *extra: str):
    cfg = out + ".yaml"  # the defaults, as the in-process reference run uses
    with open(cfg, "w") as f:
        f.write("executor: ray\n")
    return cli("run", cfg, f"input.paths=[{corpus}]", f"output_dir={out}", "workers=2", f"ray.address={address}",
               *BASE, *extra, timeout=600)


def test_ray_matches_local_and_resumes(ray_address, pipeline_run, dup_corpus, tmp_path):
    local_out, _, _ = pipeline_run
    corpus, _ = dup_corpus
    out = str(tmp_path / "ray")
    p = _run_ray(corpus, out, ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = tree_hashes(local_out, skip=SKIP)
    got = tree_hashes(out, skip=SKIP)
    assert got == ref and any(k.startswith("shards/") for k in got) and any(k.startswith("work/markers/") for k in got)

    # Done markers: drop the last stages' markers -> only those tasks run again, to the same bytes.
    for stage in ("tokenize", "shard", "finalize"):
        os.remove(os.path.join(out, "work", "markers", stage, "00000.json"))
    shutil.rmtree(os.path.join(out, "work", "timings"))
    p = _run_ray(corpus, out, ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(out, "work", "timings"))) == [
        "finalize-00000.json", "shard-00000.json", "tokenize-00000.json"]
    assert tree_hashes(out, skip=SKIP) == ref


def test_ray_task_returns_bad_input_as_one_line(dup_corpus, tmp_path):
    """What a Ray worker runs: a task's error comes back as its one-line message (the driver raises it as the
    local executor does), never as a pickled traceback; no marker is written. (No cluster needed.)"""
    from data_pipeline import config
    from data_pipeline.executor import Stage, is_done
    from data_pipeline.pipeline import Context
    from data_pipeline.ray_executor import _ray_task
    from data_pipeline.readers import InputError
    corpus, _ = dup_corpus
    cfg = config.load(None, [f"input.paths=[{corpus}]", f"output_dir={tmp_path / 'o'}", *BASE])
    ctx = Context(cfg)

    def bad(_ctx, rank):
        raise InputError(f"part-{rank}.jsonl:7: broken JSON")

    assert _ray_task(ctx, Stage("prepare", 2, bad), 1, os.getcwd()) == "part-1.jsonl:7: broken JSON"
    assert _ray_task(ctx, Stage("x", 2, lambda c, r: 1 / 0), 0, os.getcwd()) == \
        "stage x task 0: ZeroDivisionError: division by zero"
    assert not is_done(ctx.work, "prepare", 1)
