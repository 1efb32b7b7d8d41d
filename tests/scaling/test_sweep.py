"""Sweeps: config splitting, the Slurm array path (fake sbatch/squeue, fake trainer), and a real tiny sweep on the
bundled sample corpus end to end (sweep -> fit -> plan, plots written)."""
import csv
import json
import os
import stat
import sys

import pytest

from llmforge.core.config import RunConfig, load_config
from llmforge.scaling.law import ScalingError, ScalingLaw
from llmforge.scaling.sweep import load_sweep, plan_runs, sweep_main
from tests.conftest import ROOT, run_cli

FAKE_TRAINER = '''import json, os, sys
kv = dict(a.split("=", 1) for a in sys.argv[2:])
os.makedirs(kv["run_dir"], exist_ok=True)
loss = 3.0 + 64.0 / int(kv["model.dim"]) + 10.0 / int(kv["train.steps"])
with open(os.path.join(kv["run_dir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": int(kv["train.steps"]), "val_loss": loss}) + "\\n")
'''
# Runs every array index right away (SLURM_ARRAY_TASK_ID set), records its argv, prints a job id.
FAKE_SBATCH = '''#!/bin/bash
echo "$@" >> "$(dirname "$0")/sbatch.log"
for a in "$@"; do case $a in --array=*) list=${a#--array=}; list=${list%%%*};; esac; done
while [ $# -gt 0 ] && [[ $1 == --* ]]; do shift; done
for i in ${list//,/ }; do SLURM_ARRAY_TASK_ID=$i "$@" || exit 1; done
echo 4242
'''


def _exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_sweep_keys_and_trainer_keys_are_split(tmp_path):
    sweep, cfg = load_sweep("configs/scaling/sweep-tiny.yaml", ["executor=slurm", "sweep.slurm.partition=gpu",
                                                                "train.lr=0.01", "model.vocab_size=300"])
    assert (sweep.executor, sweep.slurm.partition, cfg.train.lr, cfg.model.vocab_size) == ("slurm", "gpu", 0.01, 300)
    assert sweep.sizes == [6e5, 1.5e6, 2.5e6]
    runs = plan_runs(sweep, cfg, "base.yaml")
    assert len(runs) == 6 and len({r.shape for r in runs}) == 3
    assert all(r.tokens == r.steps * 8 * 64 for r in runs)
    for bad, message in ((["executor=ray"], "not local or slurm"), (["sizes=[]"], "sweep.sizes: empty"),
                         (["tokens=[0]"], r"sweep\.tokens\[0\]=0\.0 is out of range: must be > 0"),
                         (["sweep.slurm.partiton=x"], "partition")):
        with pytest.raises(ScalingError, match=message):
            load_sweep("configs/scaling/sweep-tiny.yaml", bad)


def test_slurm_executor_submits_one_array_and_collects_results(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "sbatch", FAKE_SBATCH)
    _exe(bin_dir / "squeue", "#!/bin/bash\nexit 0\n")
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    out = tmp_path / "sweep"
    args = ["executor=slurm", "slurm.gpus_per_task=1", "slurm.max_parallel=2", "model.vocab_size=300",
            f"out_dir={out}", f"train_command=[{sys.executable},{trainer}]", "sizes=[1e5,4e5]", "tokens=[5120,20480]"]
    result = sweep_main("configs/scaling/sweep-tiny.yaml", args)
    submitted = (bin_dir / "sbatch.log").read_text().splitlines()
    assert len(submitted) == 1
    assert "--array=0,1,2,3%2" in submitted[0] and "--gpus-per-task=1" in submitted[0]
    rows = list(csv.DictReader(open(result["results"])))
    assert len(rows) == 4
    for r in rows:
        assert float(r["loss"]) == pytest.approx(3.0 + 64.0 / int(r["dim"]) + 10.0 / int(r["steps"]))
        assert int(r["tokens"]) == int(r["steps"]) * 8 * 64
    assert sorted({int(r["steps"]) for r in rows}) == [10, 40]
    # finished runs are not submitted again
    sweep_main("configs/scaling/sweep-tiny.yaml", args)
    assert len((bin_dir / "sbatch.log").read_text().splitlines()) == 1


# Tiny models on a shared 2-core machine: one OpenMP thread per run is ~20x faster than two spinning threads.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample") / "data")
    p = run_cli([sys.executable, "-m", "data_pipeline", "run", "configs/data/sample.yaml", f"output_dir={out}",
                 "workers=2"], timeout=900, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.slow
def test_real_tiny_sweep_fit_plan_end_to_end(tmp_path, sample_data):
    """6 real trainer runs (3 sizes x 2 token counts, 12 and 39 steps) on the sample corpus."""
    out = tmp_path / "sweep"
    p = run_cli([sys.executable, "-m", "llmforge.scaling", "sweep", "configs/scaling/sweep-tiny.yaml",
                 "--sizes", "6e5", "1.5e6", "2.5e6", "--tokens", "3e3", "1e4", "--out-dir", str(out),
                 f"data.paths=[{sample_data}]", "data.seq_len=32"], timeout=1200, env=ONE_THREAD)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "RESULTS.csv")))
    assert len(rows) == 6 and len({r["params"] for r in rows}) == 3
    for r in rows:
        metrics = [json.loads(x) for x in open(os.path.join(r["run_dir"], "metrics.jsonl"))]
        assert float(r["loss"]) == [m["val_loss"] for m in metrics if "val_loss" in m][-1]
        assert int(r["tokens"]) == int(r["steps"]) * 8 * 32
    by_size = {}
    for r in rows:
        by_size.setdefault(int(r["params"]), []).append((int(r["tokens"]), float(r["loss"])))
    for runs in by_size.values():   # more tokens, lower loss, at every size
        (_, short), (_, long) = sorted(runs)
        assert long < short

    p = run_cli([sys.executable, "-m", "llmforge.scaling", "fit", str(out / "RESULTS.csv"), "--out",
                 str(out / "law.json")], env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    law = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(law[k] > 0 for k in ("E", "A", "B", "alpha", "beta")) and law["points"] == 6
    assert (out / "law.png").read_bytes()[:4] == b"\x89PNG"

    # Plan at the budget whose compute-optimal size under the fitted law is the sweep's middle size: the planner
    # must come back with a model of about that size (whatever exponents such short runs give).
    middle = sorted(by_size)[1]
    fitted = ScalingLaw(**{k: law[k] for k in ("E", "A", "B", "alpha", "beta")})
    budget = 6 * (middle / fitted.g) ** ((fitted.alpha + fitted.beta) / fitted.beta)
    p = run_cli([sys.executable, "-m", "llmforge.scaling", "plan", "--law", str(out / "law.json"), "--flops",
                 repr(budget), "--gpu", "a100", "--gpus", "1", "--base", str(out / "base.yaml"),
                 "--out-dir", str(out / "plan")], env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout.strip().splitlines()[-1][len("PLAN "):])
    assert plan["shape"]["vocab_size"] == 4096 and plan["config"] == str(out / "plan" / "config.yaml")
    assert 1 / 1.3 < plan["params"] / middle < 1.3
    assert plan["predicted_loss"] == pytest.approx(fitted.loss(plan["params"], plan["tokens"]), rel=1e-6)
    cfg = load_config(RunConfig, plan["config"])
    assert cfg.data.paths == [sample_data] and cfg.data.seq_len == 32 and cfg.model.dim == plan["shape"]["dim"]
    assert (out / "plan" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
