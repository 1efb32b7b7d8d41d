"""AdamW against Muon on the tiny model and the bundled sample corpus, each at its own best learning rate.

Both optimizers train the same model from the same seed on the same data for ``--steps`` steps, once per learning
rate of a small grid (printed); validation loss every ``--eval-every`` steps. The best rate of each is the one
with the lowest final validation loss. Reported: the steps each best run needs to reach AdamW's final validation
loss (Muon's goal: <= 0.85x AdamW's), and the median wall time per step of each (Muon's Newton-Schulz overhead).
Ends with ``RESULT {json}`` (also saved under bench/results/).

    python bench/optimizers.py                      # ~5 min on 2 cores (the data pipeline run included)
    python bench/optimizers.py --data OUT_DIR       # an existing pipeline output instead of the sample corpus
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import ROOT, emit, median

GRIDS = {"adamw": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], "muon": [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]}


def prepare_data(out: str) -> str:
    """The sample corpus through the data pipeline (tokenizer + shards), once."""
    if not os.path.isfile(os.path.join(out, "stats.json")):
        subprocess.run([sys.executable, "-m", "data_pipeline", "run", "configs/data/sample.yaml", f"output_dir={out}",
                        "workers=2", "progress=false"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def train(run_dir: str, data: str, optimizer: str, lr: float, steps: int, eval_every: int) -> dict:
    """One run in a child process (a fresh interpreter each: no state shared between runs); its metrics rows."""
    cmd = [sys.executable, "-m", "llmforge.train", "configs/train/tiny-cpu.yaml", f"data.paths=[{data}]",
           f"run_dir={run_dir}", f"train.steps={steps}", f"train.optimizer={optimizer}", f"train.lr={lr}",
           f"train.eval_interval={eval_every}", "train.warmup_steps=20", "train.log_interval=5", "logging.plot=false",
           "checkpoint.interval=0"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    return {"lr": lr, "val": val, "final_val": val[max(val)], "step_time_s": median(times)}


def steps_to_reach(run: dict, target: float) -> int | None:
    return next((s for s in sorted(run["val"]) if run["val"][s] <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-optim-")
    data = a.data or prepare_data(os.path.join(tmp, "data"))
    runs = {}
    for opt, grid in GRIDS.items():
        runs[opt] = []
        for lr in grid:
            r = train(os.path.join(tmp, f"{opt}-{lr}"), data, opt, lr, a.steps, a.eval_every)
            print(f"{opt:6s} lr {lr:g}: final val loss {r['final_val']:.4f}, {r['step_time_s'] * 1e3:.1f} ms/step",
                  flush=True)
            runs[opt].append(r)
    best = {opt: min(rs, key=lambda r: r["final_val"]) for opt, rs in runs.items()}
    target = best["adamw"]["final_val"]
    reach = {opt: steps_to_reach(r, target) for opt, r in best.items()}
    ratio = reach["muon"] / reach["adamw"] if reach["muon"] and reach["adamw"] else None
    emit("optimizers", {
        "model": "tiny (configs/train/tiny-cpu.yaml)", "data": "sample corpus" if not a.data else a.data,
        "steps": a.steps, "eval_every": a.eval_every,
        "grids": {opt: {f"{r['lr']:g}": round(r["final_val"], 4) for r in rs} for opt, rs in runs.items()},
        "best_lr": {opt: r["lr"] for opt, r in best.items()},
        "final_val_loss": {opt: round(r["final_val"], 4) for opt, r in best.items()},
        "target_val_loss": round(target, 4),
        "steps_to_adamw_final_val_loss": reach,
        "muon_steps_ratio": round(ratio, 3) if ratio else None, "muon_steps_ratio_goal": 0.85,
        "step_time_s": {opt: round(r["step_time_s"], 5) for opt, r in best.items()},
        "muon_step_time_ratio": round(best["muon"]["step_time_s"] / best["adamw"]["step_time_s"], 3),
    })


if __name__ == "__main__":
    main()
