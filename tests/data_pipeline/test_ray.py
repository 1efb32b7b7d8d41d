"""executor=ray against a real Ray cluster that this test starts (`ray start --head`) and stops: the same shards,
markers and stats as the local executor byte for byte, done markers honoured on a rerun, and a bad input
reported in one line with no output left behind."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from tests.data_pipeline.conftest import BASE, ROOT, cli, tree_hashes, write_jsonl

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


def test_ray_bad_input_is_one_line_and_leaves_nothing(ray_address, tmp_path):
    corpus = tmp_path / "bad"
    write_jsonl(str(corpus / "a.jsonl"), [{"text": "fine " * 80}] * 3)
    with open(corpus / "a.jsonl", "a") as f:
        f.write("{not json\n")
    out = str(tmp_path / "out")
    p = _run_ray(str(corpus), out, ray_address)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 1 and len(err) == 1 and "a.jsonl:4: broken JSON" in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not os.path.exists(out)
