"""The pipeline: the run context, the stage list, the output folder's start / start-over and ``run()`` used by the
CLI (the final resharding and stats: finalize.py; every path under work/: work_dirs.py).

Stages (tasks): [decontaminate (1): the n-gram index of the evaluation files] -> prepare (T) -> buckets (P key ranges, dedup/stages.py) -> clusters (1) -> tokenizer (1) -> tokenize (T)
-> shard (1) -> finalize (1). T = ``tasks`` (0: automatic, task_plan.auto_tasks: at least ``workers``
when a file can be split; a resume keeps the T it began with); tasks read contiguous pieces of the input, so no
output depends on T.
Everything intermediate lives in ``<output_dir>/work``; the final outputs appear only in the last stages.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from llmforge.common.typed_config import dump_config, to_dict

from . import stats as stats_mod
from .atomic_io import read_json, write_json
from .dedup.stages import buckets_task, clusters_task
from .executor import LocalExecutor, PipelineError, SlurmExecutor, Stage, remove_temp_files, stage_results
from .manifest import adopt_unlisted, fold, listed, remove_listed, start_recording, stop_recording
from .output_dir import (check_apart_from_inputs, claim, file_digest, input_digests, load_hash_cache, os_error,
                         remove_owned, save_hash_cache, unlock)
from .filters.decontaminate import check as check_decontaminate
from .filters.quality_classifier import check as check_quality_model
from .prepare import dedup_columns, prepare_task, prepare_warmup
from .readers import Reader, expand_paths
from .sft_rows import SFTReader
from .task_plan import auto_cluster_tasks, auto_tasks, plan_tasks
from .finalize import finalize_task, shard_task
from .filters.url_filter import check_blocklists
from .tokenizer import check_model_path, tokenize_task, train_tokenizer_task
from .work_dirs import BULKY, WORK, config_file, fingerprint_file, work_dir

FINAL_OUTPUTS = ("shards", "doc_ids", "tokenizer.model", "stats.json", "config.yaml", "loss_mask", "chat_template.json",
                 "quality.png", "funnel.png")
# Keys that change how the work runs, never what it produces (left out of the resume fingerprint).
RUNTIME_KEYS = ("output_dir", "workers", "executor", "slurm", "ray", "progress", "keep_work_files",
                "tokenizer.encode_cache_words")  # keys that change how a run goes, never what it writes


class Context:
    """What every task needs: the config, the input units and the task layout (picklable, cheap)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = cfg.output_dir
        self.work = work_dir(cfg.output_dir)
        self.units = expand_paths(cfg.input)
        self.n_tasks = cfg.tasks or self._auto_tasks()
        self.pieces = plan_tasks(self.units, self.n_tasks)  # contiguous in input order: outputs ignore n_tasks
        self.n_dedup_cols = dedup_columns(cfg)
        self.n_cluster_tasks = cfg.dedup.cluster_tasks or auto_cluster_tasks(self.units, cfg.dedup.cluster_task_mb)
        self._prepare_stats = None

    def _auto_tasks(self) -> int:
        """task_plan.auto_tasks, which follows ``workers``; but a run resumed with another worker count keeps the
        count its work/ was made with (the markers are per task), when everything else is as it was."""
        n = auto_tasks(self.units, self.cfg.input.task_mb, self.cfg.workers)
        try:
            before = read_json(fingerprint_file(self.work))
        except (OSError, ValueError):
            return n
        if isinstance(before, dict) and isinstance(before.get("tasks"), int) and before["tasks"] != n:
            self.n_tasks = before["tasks"]
            if fingerprint(self, load_hash_cache(self.work)) == before.get("fingerprint"):
                return before["tasks"]
        return n

    def reader(self, counts):
        """The reader of this run's input: chat rows when ``sft.enabled`` (sft_rows.SFTReader), else documents."""
        if self.cfg.sft.enabled:
            return SFTReader(self.cfg, counts)
        return Reader(self.cfg.input, counts, (self.cfg.input.url_key,) if self.cfg.url_filter.enabled else ())

    def units_of(self, rank: int):
        """Pieces ``(kind, path, rel, lo, hi)`` of task ``rank`` (task_plan.py)."""
        return self.pieces[rank]

    @property
    def prepare_stats(self) -> list[dict]:
        if self._prepare_stats is None:
            self._prepare_stats = stage_results(self.work, "prepare", self.n_tasks)
        return self._prepare_stats


def build_stages(ctx) -> list[Stage]:
    stages = [Stage("prepare", ctx.n_tasks, prepare_task, warmup=prepare_warmup)]
    if decontaminate_on(ctx.cfg):  # the evaluation n-grams, indexed once for every prepare task
        from .prepare import decontaminate_index_task
        stages.insert(0, Stage("decontaminate", 1, decontaminate_index_task))
    if ctx.n_dedup_cols:
        stages += [Stage("buckets", ctx.n_cluster_tasks, buckets_task), Stage("clusters", 1, clusters_task)]
    stages += [Stage("tokenizer", 1, train_tokenizer_task), Stage("tokenize", ctx.n_tasks, tokenize_task),
               Stage("shard", 1, shard_task), Stage("finalize", 1, finalize_task)]
    if ctx.cfg.sft.enabled:  # chat rows: template + loss masks (data_pipeline/sft.py)
        from .sft import sft_stages
        stages = sft_stages(stages)
    return stages


def fingerprint(ctx, hash_cache: dict | None = None) -> str:
    """Hash of everything that determines the outputs: config (minus runtime keys), the input files' content and
    the tokenizer.model_path file's content (content hashes, cached: output_dir.py)."""
    cfg = to_dict(ctx.cfg)
    for key in RUNTIME_KEYS:
        *parents, last = key.split(".")
        section = functools.reduce(dict.get, parents, cfg)
        section.pop(last, None)
    cache = {} if hash_cache is None else hash_cache
    files = input_digests(ctx.units, ctx.cfg.tokenizer.model_path, cache)
    if ctx.cfg.url_filter.enabled:  # the blocklists' content decides which documents stay
        files += [["url_filter.blocklist", p, file_digest(p, cache) if os.path.isfile(p) else None]
                  for p in ctx.cfg.url_filter.blocklist]
    qc = ctx.cfg.quality_classifier
    if qc.enabled and os.path.isfile(qc.model_path):  # another model: other scores, so a start-over
        files.append(["quality_classifier.model_path", qc.model_path, file_digest(qc.model_path, cache)])
    dc = ctx.cfg.decontaminate
    if decontaminate_on(ctx.cfg):  # changed evaluation files: other documents removed, so a start-over
        files += [["decontaminate.paths", p, file_digest(p, cache) if os.path.exists(p) else None]
                  for p in dc.paths]
    blob = json.dumps({"config": cfg, "files": files, "tasks": ctx.n_tasks}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_output_dir(ctx) -> bool:
    """Claim the output folder (output_dir.py: refuses someone else's non-empty folder), create/validate
    ``work/``; if an earlier run used another config or input, start over (removing only what the manifest lists,
    manifest.py). Returns whether a run of the pipeline created the output folder (so that a failed run can
    remove it). An output_dir that contains an input or lies inside one is refused before anything is written."""
    check_apart_from_inputs(ctx.out, ctx.cfg.input.paths, [u[1] for u in ctx.units if u[0] != "hf_hub"])
    created = claim(ctx.out)
    fp_path = fingerprint_file(ctx.work)
    adopt_unlisted(ctx.out, FINAL_OUTPUTS)
    cache = load_hash_cache(ctx.work)
    fp = fingerprint(ctx, cache)
    try:
        if os.path.exists(fp_path) and read_json(fp_path).get("fingerprint") != fp:
            print(f"note: {ctx.out} holds a run with another config or input; starting over", flush=True)
            remove_listed(ctx.out, protected(ctx))
        elif not os.path.exists(fp_path) and listed(ctx.out):  # a start-over killed after the fingerprint went:
            # its markers and work files may still be there, and would be taken for this config's finished tasks
            print(f"note: {ctx.out} holds part of an earlier run without its fingerprint; starting over", flush=True)
            remove_listed(ctx.out, protected(ctx))
        os.makedirs(ctx.work, exist_ok=True)
        remove_temp_files(ctx.out, ctx.work)
        start_recording(ctx.out)
        write_json(fp_path, {"fingerprint": fp, "tasks": ctx.n_tasks})  # tasks: kept by a resume (Context)
        save_hash_cache(ctx.work, cache)
        dump_config(ctx.cfg, config_file(ctx.work))  # what Slurm tasks load
    except OSError as e:
        raise os_error(ctx.out, e) from None
    return created


def protected(ctx) -> list[str]:
    """Files and folders a cleanup never removes: the run's inputs, its tokenizer.model_path, the url_filter
    blocklists, the quality classifier's model and the decontamination files (or folders)."""
    return ([unit[1] for unit in ctx.units if unit[0] != "hf_hub"] + [ctx.cfg.tokenizer.model_path]
            + list(ctx.cfg.url_filter.blocklist)
            + ([ctx.cfg.quality_classifier.model_path] if ctx.cfg.quality_classifier.model_path else [])
            + list(ctx.cfg.decontaminate.paths))


def decontaminate_on(cfg) -> bool:
    return cfg.decontaminate.enabled and "decontaminate" in cfg.steps


def run(cfg, config_path: str | None = None) -> dict:
    """Run (or resume) the whole pipeline; return stats.json's content plus wall times."""
    ctx = Context(cfg)
    check_model_path(cfg.tokenizer.model_path)  # before any stage: a bad file used to fail after prepare
    check_blocklists(cfg)  # url_filter.blocklist files: missing / not text -> one line, nothing written
    if "quality_classifier" in cfg.steps:  # a missing or non-fastText model: one line before anything is written
        check_quality_model(cfg.quality_classifier)
    if decontaminate_on(cfg):  # every evaluation file read and indexed here: a bad one is one line, nothing written
        check_decontaminate(cfg.decontaminate)
    if cfg.executor == "ray":
        from .ray_executor import require_ray  # ray is optional: say how to install it before anything is written
        require_ray()
    created = prepare_output_dir(ctx)
    stages = build_stages(ctx)
    for s in stages:  # nothing left after filtering: the per-step table and one line, before tokenizer training
        if s.name == "tokenizer" and s.warmup is None:
            s.warmup = stats_mod.check_documents_left
    try:
        if cfg.executor == "slurm":
            walls = SlurmExecutor(cfg, config_file(ctx.work)).run(ctx, stages)
            if not cfg.slurm.wait:
                return {}
        elif cfg.executor == "ray":
            from .ray_executor import RayExecutor  # ray is an optional dependency (extra "ray")
            walls = RayExecutor(cfg).run(ctx, stages)
        else:
            walls = LocalExecutor(cfg.workers, cfg.progress).run(ctx, stages)
        fold(ctx.out)  # no task runs any more: one sorted manifest, the same bytes for a resumed run
    except PipelineError as e:
        # A data/config error: no partial output. Interruptions (SIGKILL, Ctrl-C) keep work/ for resuming.
        if e.keep_work:
            raise
        stop_recording()
        remove_temp_files(ctx.out, ctx.work)  # of workers killed mid-write when another task failed: never listed
        remove_owned(ctx.out, FINAL_OUTPUTS, created, protected(ctx))  # only what it wrote; the user's files stay
        raise
    finally:
        stop_recording()
        unlock(ctx.out)
    result = {"stats": read_json(os.path.join(ctx.out, "stats.json")), "walls": walls,
              "task_seconds": stats_mod.task_seconds(ctx, stages), "step_seconds": stats_mod.step_seconds(ctx)}
    if not cfg.keep_work_files:
        remove_bulky_work(ctx)
    return result


def remove_bulky_work(ctx) -> None:
    """Drop intermediate data (the files of it the manifest lists) but keep markers and fingerprint: a rerun
    stays a no-op."""
    remove_listed(ctx.out, protected(ctx), under=[os.path.join(WORK, name) for name in BULKY])


def run_single_task(cfg, stage_name: str, rank: int) -> None:
    """Entry point of one Slurm array task."""
    from .executor import run_task
    ctx = Context(cfg)
    stage = next((s for s in build_stages(ctx) if s.name == stage_name), None)
    if stage is None or not 0 <= rank < stage.n_tasks:
        raise PipelineError(f"no task {rank} in stage {stage_name!r}")
    run_task(ctx, stage, rank)
