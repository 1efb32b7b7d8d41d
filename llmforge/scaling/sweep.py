"""A grid of small training runs (sizes x token counts) through the normal trainer, and RESULTS.csv from their
final validation losses.

CONFIG is a trainer YAML with an optional ``sweep:`` section (SweepConfig below); ``key=value`` arguments override
either (sweep keys by name or as ``sweep.key``). Each size is a target parameter count, embeddings included (the
N of the Chinchilla fit), rounded to a Llama shape with the data's vocabulary; each token count is rounded to whole
steps of the config's global batch, and every run's cosine schedule spans its own length (as Hoffmann et al. did).
Runs go one after another locally (``executor=local``) or as one Slurm array (``executor=slurm``); finished runs
are skipped, so a rerun only collects or completes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import yaml

from llmforge.core.config import ConfigError, RunConfig, _build, _set_dotted, dump_config, opt, parse_overrides

from .law import ScalingError
from .plan import tokenizer_vocab, write_json
from .shapes import Shape, round_to_shape
from llmforge.common.atomic import atomic_path
from llmforge.common.slurm import TASK_SCRIPT, array_sbatch_args, submit, wait_for_jobs

COLUMNS = ("params", "tokens", "loss", "non_embedding_params", "flops", "n_layers", "dim", "n_heads", "n_kv_heads",
           "ffn_dim", "steps", "run_dir")

@dataclasses.dataclass
class SweepSlurmConfig:
    partition: str = opt("", "sbatch --partition (empty: the cluster default)")
    time: str = opt("", "sbatch --time per run, e.g. 02:00:00 (empty: default)")
    gpus_per_task: int = opt(0, "sbatch --gpus-per-task (0: none, CPU runs)", ge=0)
    cpus_per_task: int = opt(1, "sbatch --cpus-per-task", ge=1)
    mem: str = opt("", "sbatch --mem, e.g. 32G (empty: default)")
    max_parallel: int = opt(0, "array throttle %N (0: none)", ge=0)
    extra_args: list[str] = opt([], "more sbatch arguments, passed as separate argv items")
    python: str = opt("", "python interpreter of the array tasks (empty: the one submitting)")
    wait: bool = opt(True, "poll until the array finishes, then write RESULTS.csv (false: submit and return)")
    poll_s: float = opt(5.0, "seconds between squeue polls", gt=0)


@dataclasses.dataclass
class SweepConfig:
    sizes: list[float] = opt([], "target parameter counts, embeddings included; each is rounded to a Llama shape", gt=0)
    tokens: list[float] = opt([], "training tokens per run; rounded to whole steps of train.global_batch_size", gt=0)
    out_dir: str = opt("runs/scaling-sweep", "runs/<name>/, logs/, base.yaml and RESULTS.csv go here")
    results: str = opt("", "RESULTS.csv path (empty: out_dir/RESULTS.csv)")
    executor: str = opt("local", "local (one run after another) | slurm (one sbatch array)")
    nproc: int = opt(1, "processes per run (> 1: torch.distributed.run --standalone)", ge=1)
    train_command: list[str] = opt([], "argv that starts the trainer (empty: python -m llmforge.train)")
    slurm: SweepSlurmConfig = opt(SweepSlurmConfig(), "Slurm array settings (executor: slurm)")


@dataclasses.dataclass
class Run:
    name: str
    shape: Shape
    steps: int
    tokens: int
    run_dir: str
    argv: list[str]


def load_sweep(path: str, args: list[str]) -> tuple[SweepConfig, RunConfig]:
    """Split CONFIG + key=value arguments into the sweep section and the trainer config."""
    if not os.path.isfile(path):
        raise ScalingError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ScalingError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ScalingError(f"{path}: top level must be a mapping of config keys")
    sweep_raw = raw.pop("sweep", None) or {}
    if not isinstance(sweep_raw, dict):
        raise ScalingError(f"{path}: sweep must be a mapping of sweep keys")
    sweep_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    try:
        for k, v in parse_overrides(args):
            if k.startswith("sweep."):
                _set_dotted(sweep_raw, k[len("sweep."):], v, SweepConfig)
            elif k.split(".")[0] in sweep_keys:
                _set_dotted(sweep_raw, k, v, SweepConfig)
            else:
                _set_dotted(raw, k, v, RunConfig)
        sweep = _build(SweepConfig, sweep_raw, prefix="sweep.")
        cfg = _build(RunConfig, raw)
        cfg.validate()
    except ConfigError as e:
        raise ScalingError(f"{path}: {e}") from None
    if sweep.executor not in ("local", "slurm"):
        raise ScalingError(f"sweep.executor: {sweep.executor!r} is not local or slurm")
    for key in ("sizes", "tokens"):
        values = getattr(sweep, key)
        if not values:
            raise ScalingError(f"sweep.{key}: empty; give --{key} or sweep.{key} in {path}")
    return sweep, cfg


def _tag(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def with_resolved_vocab(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with model.vocab_size set (from the preset or the data's tokenizer); the caller's stays."""
    from llmforge.model.presets import PRESETS
    vocab = cfg.model.vocab_size or getattr(PRESETS.get(cfg.model.preset), "vocab_size", 0) \
        or tokenizer_vocab(cfg.data.paths)
    if not vocab:
        raise ScalingError("no vocabulary size: set model.vocab_size or point data.paths at a pipeline output with "
                           "tokenizer.model")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def plan_runs(sweep: SweepConfig, cfg: RunConfig, base_path: str) -> list[Run]:
    """The grid: one Run per (distinct rounded shape, distinct step count)."""
    cfg = with_resolved_vocab(cfg)
    vocab = cfg.model.vocab_size
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    shapes = list(dict.fromkeys(round_to_shape(s, vocab) for s in sweep.sizes))
    steps_list = list(dict.fromkeys(max(1, round(t / tokens_per_step)) for t in sweep.tokens))
    launcher = list(sweep.train_command) or (
        [sys.executable, "-m", "llmforge.train"] if sweep.nproc == 1 else
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sweep.nproc}",
         "-m", "llmforge.train"])
    runs = []
    for shape in shapes:
        for steps in steps_list:
            tokens = steps * tokens_per_step
            name = f"n{_tag(shape.params())}-d{_tag(tokens)}"
            run_dir = os.path.join(os.path.abspath(sweep.out_dir), "runs", name)
            warmup = min(cfg.train.warmup_steps, max(1, steps // 10))  # short runs still decay over most of their steps
            keys = {f"model.{k}": v for k, v in shape.model_overrides().items()}
            keys.update({"run_dir": run_dir, "train.steps": steps, "train.warmup_steps": warmup})
            argv = launcher + [base_path] + [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                             for k, v in keys.items()]
            runs.append(Run(name, shape, steps, tokens, run_dir, argv))
    return runs


def final_val_loss(run_dir: str, steps: int) -> float | None:
    """The validation loss logged at the run's last step (None while the run has not finished)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "val_loss" in row and row.get("step") == steps:
                last = row["val_loss"]
    return last


def _run_local(runs: list[Run], logs: str) -> None:
    for i, run in enumerate(runs, 1):
        if final_val_loss(run.run_dir, run.steps) is not None:
            print(f"[{i}/{len(runs)}] {run.name}: already finished", flush=True)
            continue
        log = os.path.join(logs, f"{run.name}.log")
        print(f"[{i}/{len(runs)}] {run.name}: {run.shape.describe()}, {run.steps} steps (log {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(run.argv, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = open(log, errors="replace").read().strip().splitlines()[-1:]
            raise RuntimeError(f"run {run.name} failed (exit {rc}); see {log}" + (f": {tail[0]}" if tail else ""))
        print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)


def _run_slurm(sweep: SweepConfig, runs: list[Run], out_dir: str) -> bool:
    """Submit the unfinished runs as one array; True when they are all finished (waited for)."""
    pending = [i for i, r in enumerate(runs) if final_val_loss(r.run_dir, r.steps) is None]
    if not pending:
        return True
    sdir = os.path.join(out_dir, "slurm")
    os.makedirs(os.path.join(sdir, "logs"), exist_ok=True)
    spec, script = os.path.join(sdir, "runs.json"), os.path.join(sdir, "task.sh")
    write_json(spec, [r.argv for r in runs])
    with atomic_path(script) as tmp:
        with open(tmp, "w") as f:
            f.write(TASK_SCRIPT)
        os.chmod(tmp, 0o755)
    s = sweep.slurm
    args = array_sbatch_args("scaling-sweep", pending, f"{sdir}/logs/%a.out", s)
    args += [script, s.python or sys.executable, "-m", "llmforge.scaling", "task", spec]
    job = submit(args, RuntimeError)
    print(f"submitted job {job}: array of {len(pending)} runs (logs {sdir}/logs/)", flush=True)
    if not s.wait:
        return False
    wait_for_jobs([job], s.poll_s)
    return True


def run_task(spec: str) -> int:
    """Inside a Slurm array task: run the trainer argv at index SLURM_ARRAY_TASK_ID of the spec."""
    with open(spec) as f:
        argvs = json.load(f)
    index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return subprocess.run(argvs[index]).returncode


def write_results(path: str, runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        loss = final_val_loss(r.run_dir, r.steps)
        if loss is None:
            raise RuntimeError(f"run {r.name} has no validation loss at step {r.steps} in {r.run_dir}/metrics.jsonl "
                               "(failed, unfinished, or no validation split in the data)")
        s = r.shape
        rows.append({"params": s.params(), "tokens": r.tokens, "loss": loss,
                     "non_embedding_params": s.non_embedding_params(), "flops": 6 * s.params() * r.tokens,
                     "n_layers": s.n_layers, "dim": s.dim, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
                     "ffn_dim": s.ffn_dim, "steps": r.steps, "run_dir": r.run_dir})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def sweep_main(config: str, args: list[str]) -> dict | None:
    """Run (or submit) the grid; return {"results": path, "runs": n} once RESULTS.csv is written."""
    sweep, cfg = load_sweep(config, args)
    out_dir = os.path.abspath(sweep.out_dir)
    base = os.path.join(out_dir, "base.yaml")
    cfg = with_resolved_vocab(cfg)
    runs = plan_runs(sweep, cfg, base)
    dump_config(cfg, base)  # the trainer config every run starts from (vocab resolved; sweep keys removed)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    print(f"sweep: {len(runs)} runs ({len(set(r.shape for r in runs))} sizes x "
          f"{len(set(r.steps for r in runs))} token counts), N counts embeddings; out {out_dir}", flush=True)
    if sweep.executor == "local":
        _run_local(runs, os.path.join(out_dir, "logs"))
    elif not _run_slurm(sweep, runs, out_dir):
        print("not waiting (slurm.wait=false): rerun the same command to collect RESULTS.csv", flush=True)
        return None
    results = sweep.results or os.path.join(out_dir, "RESULTS.csv")
    rows = write_results(results, runs)
    for r in rows:
        print(f"  params {r['params']:>12,}  tokens {r['tokens']:>12,}  loss {r['loss']:.4f}")
    return {"results": results, "runs": len(rows), "base_config": base}
