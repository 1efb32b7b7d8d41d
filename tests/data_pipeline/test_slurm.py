"""The Slurm executor on a real one-node cluster: the stage job arrays (afterok-chained) produce exactly the
local executor's outputs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.data_pipeline.conftest import BASE, ROOT, kept_ids, run_inproc, tree_hashes
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow
SKIP = ("work/timings", "config.yaml", "work/config.yaml", "work/slurm",
        "work/manifest.json")  # the manifest also lists work/slurm/task.sh


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_slurm_arrays_equal_local(slurm, dup_corpus, tmp_path):
    corpus, _ = dup_corpus
    local = str(tmp_path / "local")
    run_inproc(corpus, local, "workers=2", "tasks=3")
    out = str(tmp_path / "slurm")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("executor: slurm\nslurm:\n  poll_s: 0.5\n  time: '00:10:00'\n")
    env = dict(slurm.env, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "data_pipeline", "run", str(cfg), f"input.paths=[{corpus}]",
                        f"output_dir={out}", "tasks=3", *BASE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "submitted prepare: job" in p.stderr and "submitted finalize: job" in p.stderr
    logs = os.listdir(os.path.join(out, "work", "slurm", "logs"))
    assert sorted(n for n in logs if n.startswith("prepare-")) == ["prepare-0.out", "prepare-1.out", "prepare-2.out"]
    assert kept_ids(out) == kept_ids(local)
    assert tree_hashes(out, SKIP) == tree_hashes(local, SKIP)
