"""Validation loss of a run's newest checkpoint: ``python -m llmforge.eval RUN_DIR [key=value ...] [--batches N]``.

Benchmarks instead: ``python -m llmforge.eval RUN_DIR --tasks T1,T2 [--include-path DIR] [--limit N]
[--num-fewshot K]`` runs lm-evaluation-harness tasks (llmforge.inference.benchmarks; shipped ones in llmforge/inference/eval_tasks)
offline and writes ``RUN_DIR/eval_tasks.json`` (per task and metric) beside eval.json.

Prints one JSON line and writes it atomically to ``RUN_DIR/eval.json``: ``loss`` (mean token cross-entropy over
the validation windows), ``perplexity`` = exp(loss), ``tokens`` (targets scored), ``checkpoint``, ``step``.
The windows are the ones training validates on (``data.paths`` from the run's config.yaml, overridable) and are
scored by the same ``ParallelModel.evaluate`` the native engine validates with; by default the whole validation
split is used, capped at ``DEFAULT_MAX_TOKENS`` target tokens so a huge split does not run for hours
(``--batches 0``: no cap).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch

from llmforge.core.config import ConfigError
from llmforge.data.sft import build_any_datasets as build_datasets
from llmforge.inference.run_loading import load_run, run_cli
from llmforge.common.atomic import write_json

DEFAULT_MAX_TOKENS = 1 << 20  # ~1M scored tokens: a perplexity good to well under 1% on any real split


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llmforge.eval",
                                description="Validation loss/perplexity of a run's newest complete checkpoint.")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.paths=[outputs/sample]")
    p.add_argument("--batches", default=None,
                   help="validation batches to score: N, 0 for the whole split, or 'train' for the run's "
                        "train.eval_batches (default: the whole split up to ~1M tokens)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sequences per batch (default: train.micro_batch_size, else train.global_batch_size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoints/step_N dir (default: newest complete)")
    b = p.add_argument_group("benchmarks (lm-evaluation-harness; writes eval_tasks.json instead of eval.json)")
    b.add_argument("--tasks", default=None, help="comma-separated task names, e.g. sample_valid_bpb,sample_next_line_mc")
    b.add_argument("--include-path", action="append", default=[], help="a folder of lm-eval task YAML files (repeatable)")
    b.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    b.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    b.add_argument("--bootstrap-iters", type=int, default=0, help="bootstrap resamples for stderr (0: none)")
    return p.parse_intermixed_args(argv)


def max_batches(option: str | None, cfg, batch_size: int) -> int:
    if option is None:
        return max(1, math.ceil(DEFAULT_MAX_TOKENS / (batch_size * cfg.data.seq_len)))
    if option == "train":  # the windows training's evaluation scores: eval_batches global batches
        return math.ceil(cfg.train.eval_batches * cfg.train.global_batch_size / batch_size)
    if not option.isdigit():
        raise ConfigError(f"--batches: expected a number, 0 or 'train', got {option!r}")
    return int(option)


def write_json_atomic(path: str, obj: dict) -> None:
    write_json(path, obj, sort_keys=False)


def run_eval(run_dir: str, overrides=None, batches: str | None = None, batch_size: int = 0,
             device: str = "auto", checkpoint: str | None = None) -> dict:
    from llmforge.core.distributed import pick_device
    from llmforge.parallel import ParallelModel
    from llmforge.core.distributed import resolve_dtype
    dev = pick_device(device)
    run = load_run(run_dir, overrides, device=dev, checkpoint=checkpoint, log=lambda m: print(m, file=sys.stderr))
    cfg = run.cfg
    if cfg.data.seq_len > run.model.args.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={run.model.args.max_seq_len}")
    from llmforge.data.checks import check_data
    check_data(cfg.data, run.model.args.vocab_size)  # overridden data.paths: same tokenizer, ids within the model
    _, valid = build_datasets(cfg.data, cfg.seed, cfg.sft.pack)  # a packed run's validation packs
    if not valid:
        raise ConfigError(f"data.paths={cfg.data.paths}: no validation windows (no shards/valid-* and "
                          f"data.valid_fraction={cfg.data.valid_fraction})")
    bs = batch_size or cfg.train.micro_batch_size or cfg.train.global_batch_size
    n_batches = max_batches(batches, cfg, bs)
    amp = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if resolve_dtype(cfg.train.dtype, dev) == torch.bfloat16
           else contextlib.nullcontext)
    loss, tokens = ParallelModel([run.model]).evaluate(valid, bs, n_batches, dev, amp)
    if not tokens:
        raise ConfigError("the validation split produced no tokens")
    from llmforge.data.sft import is_sft_data
    sft = is_sft_data(cfg.data.paths)  # fine-tuning data: only response tokens are scored
    available = sum(v.scored_tokens() for v in valid) if sft else sum(len(v) for v in valid) * cfg.data.seq_len
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "checkpoint": os.path.abspath(run.checkpoint),
            "step": run.step, "seq_len": cfg.data.seq_len, "batch_size": bs, "data_paths": list(cfg.data.paths),
            "whole_split": tokens == available, "response_only": sft, "document_mask": cfg.data.document_mask}


def check_args(a) -> None:
    """Refuse out-of-range numeric options in one line before anything is loaded (a negative --limit used to reach
    lm-eval and fail there with an islice traceback)."""
    if a.batches is not None and a.batches != "train" and not a.batches.isdigit():
        raise ConfigError(f"--batches: expected a number, 0 or 'train', got {a.batches!r}")
    if a.batch_size < 0:
        raise ConfigError(f"--batch-size must be >= 0 (0: the run's micro/global batch), got {a.batch_size}")
    if a.limit is not None and not (math.isfinite(a.limit) and a.limit > 0):
        raise ConfigError(f"--limit must be a number > 0 (examples per task, or a fraction of each task if < 1), "
                          f"got {a.limit}")
    if a.num_fewshot is not None and a.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0 (omit it for each task's own default), got {a.num_fewshot}")
    if a.bootstrap_iters < 0:
        raise ConfigError(f"--bootstrap-iters must be >= 0 (0: no stderr), got {a.bootstrap_iters}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        check_args(a)
        if a.tasks is not None:
            return _tasks(a)
        result = run_eval(a.run_dir, a.overrides, a.batches, a.batch_size, a.device, a.checkpoint)
        write_json_atomic(os.path.join(a.run_dir, "eval.json"), result)
        print(json.dumps(result))
        return 0
    return run_cli(body)


def _tasks(a) -> int:
    from llmforge.inference.benchmarks import run_tasks_on_run
    if a.overrides or a.batches is not None:
        raise ConfigError("--tasks takes no config overrides or --batches (benchmarks bring their own data)")
    names = [t for t in a.tasks.split(",") if t.strip()]
    result = run_tasks_on_run(a.run_dir, [t.strip() for t in names], a.include_path, a.limit, a.num_fewshot,
                              a.batch_size or 16, a.device, a.checkpoint, a.bootstrap_iters)
    write_json_atomic(os.path.join(a.run_dir, "eval_tasks.json"), result)
    print(json.dumps({"eval_tasks": os.path.join(a.run_dir, "eval_tasks.json"), **result["metrics"]}))
    return 0
