"""Downstream benchmarks with lm-evaluation-harness, offline: task lookup, validation, running, flat metrics.

Used by ``python -m llmforge.eval RUN_DIR --tasks T1,T2 [--include-path DIR] [--limit N] [--num-fewshot K]``
(writes ``RUN_DIR/eval_tasks.json``) and, during training, by :func:`run_tasks_on_model`, which returns flat
``{"task/metric": value}`` numbers for metrics.jsonl. Tasks are looked up in the tasks shipped with llmforge
(``llmforge/inference/eval_tasks``), then the ``--include-path`` folders, then lm-eval's own catalogue. Nothing is
downloaded: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` default to 1 here (set them to 0 yourself to allow it).
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import json
import logging
import os
import random
import sys

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # before datasets/huggingface_hub read them (they do at import)

import numpy as np
import torch
import yaml

from llmforge.core.config import ConfigError

SHIPPED_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
_TASK_MANAGERS: dict[tuple, object] = {}
KEPT = ("results", "groups", "n-samples", "n-shot", "versions", "higher_is_better")  # of lm-eval's output


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("benchmarks need lm-eval: pip install 'llmforge[eval]' (lm-eval==0.4.13, accelerate)") from None
    # datasets/huggingface_hub may have been imported before this module set the variables: pin them too
    for mod, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        if mod in sys.modules and os.environ.get(attr) == "1":
            setattr(sys.modules[mod], attr, True)


class _AnyTagLoader(yaml.SafeLoader):
    """lm-eval task files use tags such as ``!function utils.x``: accept any tag, only syntax matters here."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_files(include_paths: list[str]) -> None:
    """Every .yaml under the include paths must parse to a mapping: else one line naming file and line."""
    for root in include_paths:
        if not os.path.isdir(root):
            raise ConfigError(f"--include-path {root}: not a folder")
        for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = yaml.load(f, Loader=_AnyTagLoader)  # noqa: S506 - a SafeLoader subclass
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f":{mark.line + 1}" if mark is not None else ""
                what = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"{path}{where}: task file does not parse: {what}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: task file is not UTF-8 ({e.reason})") from None
            if not isinstance(doc, dict):
                raise ConfigError(f"{path}: a task file must be a YAML mapping (task:, dataset_path:, ...)")


def task_manager(include_paths: list[str], names: list[str], what: str = "--tasks"):
    """An lm-eval TaskManager that knows every requested name. lm-eval's own catalogue (thousands of files) is
    indexed only when a name is not among the shipped and included tasks. Cached per set of folders."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    paths = [SHIPPED_TASKS_DIR, *[os.path.abspath(p) for p in include_paths]]
    best = None
    for defaults in (False, True):
        if defaults and best is not None and not any(_maybe_builtin(n) for n in unknown_tasks(best, names)):
            break  # indexing lm-eval's ~14k task files takes seconds: skip it when no name can be there
        key = (tuple(paths), defaults)
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults)
        best = _TASK_MANAGERS[key]
        if not unknown_tasks(best, names):
            return best
    missing = unknown_tasks(best, names)
    hints = {n: difflib.get_close_matches(n, best.all_tasks, n=3) for n in missing}
    hint = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
    raise ConfigError(f"{what}: unknown task {', '.join(map(repr, missing))} (not in llmforge/inference/eval_tasks, the "
                      f"include paths {include_paths or '(none)'} or lm-eval's tasks)" + (f"; {hint}" if hint else ""))


def _maybe_builtin(name: str) -> bool:
    """Whether ``name`` may be one of lm-eval's own tasks: a glob, or a string found in one of its task files."""
    if any(c in name for c in "*?["):
        return True
    import lm_eval.tasks
    needle = name.encode()
    for path in glob.iglob(os.path.join(os.path.dirname(lm_eval.tasks.__file__), "**", "*.yaml"), recursive=True):
        with open(path, "rb") as f:
            if needle in f.read():
                return True
    return False


def unknown_tasks(tm, names: list[str]) -> list[str]:
    known = set(tm.all_tasks)
    return [n for n in names if n not in known and not tm.match_tasks([n])]


@contextlib.contextmanager
def preserved_rng():
    """lm-eval seeds python/numpy/torch globally: keep a training run's random streams untouched."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(lm, tasks: list[str], include_paths: list[str] | None = None, limit: float | None = None,
                   num_fewshot: int | None = None, bootstrap_iters: int = 0) -> dict:
    """lm-eval's results dict for ``tasks`` on an LM instance (``results``, ``n-samples``, ``versions``...)."""
    include_paths = list(include_paths or [])
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    check_task_files(include_paths)
    tm = task_manager(include_paths, tasks)
    from lm_eval import simple_evaluate
    for name in ("lm-eval", "lm_eval"):  # its INFO lines per task and request drown a training log
        logging.getLogger(name).setLevel(logging.WARNING)
    with preserved_rng():
        try:
            out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False)
        except ConfigError:
            raise
        except (FileNotFoundError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--tasks {','.join(tasks)}: lm-eval could not build or run a task: {first}") from None
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` from lm-eval's results: stderr and non-numbers dropped; a metric under a filter
    other than ``none`` is named ``metric_filter`` (e.g. ``exact_match_strict-match``)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            flat[f"{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return flat


def run_tasks_on_model(model, tokenizer, tasks: list[str], include_path: str | list[str] | None = None,
                       limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                       max_length: int | None = None) -> dict[str, float]:
    """Benchmarks on an unsharded in-memory model (e.g. rank 0's gathered copy during training): flat
    ``{"task/metric": value}``. The model's train/eval mode and every global RNG are restored afterwards."""
    from llmforge.inference.lm_eval_adapter import LLMForgeLM
    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    lm = LLMForgeLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return flat_metrics(evaluate_tasks(lm, list(tasks), paths, limit, num_fewshot))


def unsharded_copy(model_parts, margs, tmp_dir: str, device="cpu"):
    """Collective (every rank calls it): the model gathered the way checkpoints are. Each rank writes its shards of
    the weights with DCP into ``tmp_dir`` (any layout: DDP, ZeRO-1/2/3, TP, PP parts), then rank 0 reads them into
    one unsharded Transformer; other ranks get None. The folder is removed before returning."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from llmforge.model.lora import adapter_spec, add_adapters, merge
    from llmforge.inference.run_loading import empty_model
    from llmforge.core.safe_pickle import SafeFileSystemReader
    lora = adapter_spec(model_parts)
    if dist.is_initialized() and dist.get_world_size() > 1:  # a pipeline rank without blocks learns it here
        specs = [None] * dist.get_world_size()
        dist.all_gather_object(specs, lora)
        lora = next((s for s in specs if s is not None), None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    state = {}
    for part in model_parts:
        state.update(get_model_state_dict(part))
    dcp.save({"model": state}, checkpoint_id=tmp_dir, no_dist=not dist.is_initialized())
    if dist.is_initialized():
        dist.barrier()
    model = None
    try:
        if rank == 0:
            model = empty_model(margs, device)
            if lora:  # fine-tuned adapters: load them beside the frozen weights, then fold them in
                add_adapters(model, **lora)
            full = {"model": model.state_dict()}
            dcp.load(full, storage_reader=SafeFileSystemReader(tmp_dir), no_dist=True)
            model.load_state_dict(full["model"])
            model = merge(model) if lora else model
            model.eval()
    finally:
        if dist.is_initialized():
            dist.barrier()  # nobody still reads or writes the folder
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return model


def check_training_tasks(eval_cfg, tok_path: str | None) -> None:
    """Before training starts (not at the first evaluation): lm-eval installed, a tokenizer to read text with, task
    files that parse, every name known. One ConfigError line otherwise."""
    if not eval_cfg.tasks:
        return
    if not tok_path:
        raise ConfigError("eval.tasks: the run has no tokenizer.model (token-id data): lm-eval tasks are text")
    check_task_files(list(eval_cfg.include_paths))
    task_manager(list(eval_cfg.include_paths), list(eval_cfg.tasks), "eval.tasks")


def run_tasks_in_training(model_parts, margs, tokenizer, eval_cfg, run_dir: str, device="cpu") -> dict[str, float]:
    """Collective: ``eval.tasks`` on the training model (any layout), as flat ``{"task/metric": value}`` numbers
    on every rank. Rank 0 scores an unsharded copy (:func:`unsharded_copy`) while the others wait; the training
    model, its mode and every RNG are untouched."""
    import torch.distributed as dist
    model = unsharded_copy(model_parts, margs, os.path.join(run_dir, ".benchmark_weights"), device)
    out: list = [None]
    if model is not None:
        try:
            out[0] = run_tasks_on_model(model, tokenizer, list(eval_cfg.tasks), list(eval_cfg.include_paths),
                                        eval_cfg.limit or None,
                                        None if eval_cfg.num_fewshot < 0 else eval_cfg.num_fewshot, eval_cfg.batch_size)
        except Exception as e:  # noqa: BLE001 - shared with the other ranks below, then raised everywhere
            out[0] = e
        del model
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def run_tasks_on_run(run_dir: str, tasks: list[str], include_paths: list[str] | None = None,
                     limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                     device: str = "auto", checkpoint: str | None = None, bootstrap_iters: int = 0) -> dict:
    """What ``python -m llmforge.eval RUN --tasks ...`` writes to eval_tasks.json."""
    include_paths = list(include_paths or [])
    check_task_files(include_paths)       # cheap checks first: a bad task name fails before the model loads
    task_manager(include_paths, tasks)
    from llmforge.inference.lm_eval_adapter import LLMForgeLM
    lm = LLMForgeLM(run_dir=run_dir, checkpoint=checkpoint, batch_size=batch_size, device=device)
    out = evaluate_tasks(lm, tasks, include_paths, limit, num_fewshot, bootstrap_iters)
    from lm_eval.utils import handle_non_serializable  # numpy scalars and the like -> JSON types
    out = json.loads(json.dumps({k: out.get(k, {}) for k in KEPT}, default=handle_non_serializable))
    return {"checkpoint": os.path.abspath(lm.checkpoint), "step": lm.step, "tasks": list(tasks),
            "include_paths": [os.path.abspath(p) for p in include_paths], "limit": limit, "num_fewshot": num_fewshot,
            "batch_size": lm.batch_size, "max_length": lm.max_length, "metrics": flat_metrics(out), **out}


def plot_benchmarks(run_dir: str) -> str | None:
    """benchmarks.png beside loss.png: every ``task/metric`` logged in metrics.jsonl against the step, one panel
    per task. None when the run logged no benchmark."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    series: dict[str, dict[str, list]] = {}
    for r in rows:
        for key, value in r.items():
            if "/" in key and "step" in r and isinstance(value, (int, float)):
                task, metric = key.split("/", 1)
                series.setdefault(task, {}).setdefault(metric, []).append((r["step"], value))
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False)
    for ax, (task, metrics) in zip(axes[:, 0], sorted(series.items())):
        for metric, points in sorted(metrics.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=metric)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize="small")
    from llmforge.common.atomic import save_figure
    return save_figure(fig, os.path.join(run_dir, "benchmarks.png"))
