"""The one training loop, for every engine and layout.

``Trainer`` owns what is not engine-specific: the learning-rate schedule, the logging cadence, the non-finite-step
policy (skip the update, stop after ``train.max_bad_steps`` in a row), metrics, resume bookkeeping and the
reliability harness's fault hooks; validation, benchmarks and checkpoints are components that decide their own
cadence (llmforge.train.components). The engine (``llmforge.train.engines``) owns forward/backward, clipping, the
optimizer step, validation and the checkpoint format.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from llmforge.common.atomic import copy_file
from llmforge.core.config import ConfigError, dump_config, to_dict
from llmforge.core.distributed import init_distributed
from llmforge.core.optim import lr_factor
from llmforge.train.components import Benchmarks, Checkpoints, Validation
from llmforge.train.engines.base import Engine, TrainState, TrainingError
from llmforge.train.metrics import MetricsLogger, StepMetrics, plot_run
from llmforge.train.moe_balance import MoEBalance
from llmforge.train.run_guard import (PREEMPTED_EXIT, RunLock, StopSignal, check_run_dir, check_run_dir_owner,
                                      die_with_parent, write_fingerprint)
from llmforge.train.run_plan import RunPlan, plan_run, with_expanded_paths


def fault_steps(kind: str) -> set[int]:
    """Test hook for the reliability harness: LLMFORGE_FAULT="nan@3,4" or "kill@5" (never set in real runs)."""
    spec = os.environ.get("LLMFORGE_FAULT", "")
    if not spec.startswith(kind + "@"):
        return set()
    return {int(x) for x in spec.split("@", 1)[1].split(",") if x}


def engine_class(name: str):
    if name == "deepspeed":
        from llmforge.train.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine
    from llmforge.train.engines.native import NativeEngine
    return NativeEngine


def write_run_files(cfg, plan: RunPlan, engine: Engine) -> None:
    """Rank 0: the resolved config, the tokenizer the run trains with, the engine's own files."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    if plan.tok_path:
        copy_file(plan.tok_path, os.path.join(cfg.run_dir, "tokenizer.model"))
    from llmforge.common.chat import copy_chat_template
    copy_chat_template(cfg.data.paths, cfg.run_dir)  # SFT data: generate / export_hf use it
    write_fingerprint(cfg, plan)
    engine.write_run_files(cfg.run_dir)


class BatchFeed:
    """This rank's slice of each global batch. On CUDA the next step's batch is built in a background thread into
    pinned memory while the current step runs, and copied with ``non_blocking``; on CPU it is built in place."""

    def __init__(self, stream, local_bs: int, dp_rank: int, device):
        self.stream, self.local_bs, self.dp_rank, self.device = stream, local_bs, dp_rank, device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batch-feed") if device.type == "cuda" else None
        self.pending = None  # (samples consumed, future of the host batch)

    def _host(self, samples: int) -> torch.Tensor:
        batch = self.stream.batch(samples + self.dp_rank * self.local_bs, self.local_bs)
        return batch.pin_memory() if self.pool is not None else batch

    def get(self, samples: int, next_samples: int) -> torch.Tensor:
        if self.pending is not None and self.pending[0] == samples:
            host = self.pending[1].result()
        else:
            host = self._host(samples)
        if self.pool is not None:
            self.pending = (next_samples, self.pool.submit(self._host, next_samples))
        return host.to(self.device, non_blocking=True)


class Trainer:
    def __init__(self, cfg, plan: RunPlan, engine: Engine, rank: int, world: int, device):
        self.cfg, self.plan, self.engine, self.rank, self.device = cfg, plan, engine, rank, device
        self.log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
        self.step, self.samples, self.bad = 0, 0, 0
        self.step_metrics = StepMetrics(cfg.train.global_batch_size, cfg.data.seq_len, world,
                                        engine.flops_per_token, device, engine.fp8_flops_per_token)
        self.nan_steps, self.kill_steps = fault_steps("nan"), fault_steps("kill")
        self.metrics: MetricsLogger | None = None
        self.stop: StopSignal | None = None
        self.tokenizer = None  # eval.tasks: the run's sentencepiece model, loaded at the first benchmark
        self.world = world
        self.bad_t = torch.zeros((), dtype=torch.int64, device=device)      # consecutive skipped steps
        self.bad_peak_t = torch.zeros((), dtype=torch.int64, device=device)  # their longest run since the last check
        self.feed = BatchFeed(plan.train_stream, plan.local_bs, engine.dp_rank, device)
        t = cfg.train
        self.checkpoints = Checkpoints(engine, cfg.checkpoint.interval, t.steps, self.state)
        self.components = [
            Validation(engine, plan.valid, plan.eval_batches, t.eval_interval, t.steps, lambda r: self.metrics.log(r)),
            Benchmarks(cfg.eval.tasks, cfg.eval.interval or t.eval_interval, t.steps, self.benchmark),
            self.checkpoints]
        self.moe = (MoEBalance(engine.model_parts(), plan.margs, cfg.parallel.pp, device)
                    if plan.margs.moe.num_experts else None)

    def stop_requested(self) -> int:
        """The signal number when any rank got SIGTERM/SIGUSR1. Ranks agree (all-reduce) on the steps that read
        the host anyway (logged ones), so they all stop at the same step; one process checks every step."""
        if self.stop is None or (self.world > 1 and not self.is_log_step(self.step)):
            return 0
        if self.world == 1:
            return self.stop.signum
        flag = torch.tensor(self.stop.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ------------------------------------------------------------------ one step
    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def train_step(self) -> dict:
        """Forward/backward, clip, apply or skip. On steps that are not logged nothing is read on the host when the
        engine can skip on the device (fused AdamW): loss, norm and the skip decision stay device tensors."""
        t, engine = self.cfg.train, self.engine
        lr = engine.set_lr(t.lr * lr_factor(self.step, t))
        loss = engine.forward_backward(self.feed.get(self.samples, self.samples + t.global_batch_size))
        if self.step + 1 in self.nan_steps:
            loss = loss * float("nan")
        norm = engine.clip_grad_norm(t.grad_clip)
        finite = torch.isfinite(loss) if norm is None else torch.isfinite(loss) & torch.isfinite(norm)
        if not self.is_log_step(self.step + 1) and engine.optim_step_async(finite):
            self.bad_t = torch.where(finite, 0, self.bad_t + 1)
            self.bad_peak_t = torch.maximum(self.bad_peak_t, self.bad_t)  # a run of skips between two logs
            return {"loss": loss, "lr": lr, "norm": norm, "applied": None, "moe": self.moe_step(finite)}
        applied = engine.optim_step(apply=bool(finite.item()))
        self.bad_t = torch.zeros_like(self.bad_t) if applied else self.bad_t + 1
        self.bad_peak_t = torch.maximum(self.bad_peak_t, self.bad_t)
        return {"loss": loss, "lr": lr, "norm": norm, "applied": applied, "moe": self.moe_step(finite)}

    def moe_step(self, finite: torch.Tensor) -> dict:
        """Expert load metrics (on logged steps) and the balance=bias update (llmforge/train/moe_balance.py)."""
        return self.moe.after_step(finite, self.is_log_step(self.step + 1)) if self.moe is not None else {}

    def apply_policy(self, out: dict) -> None:
        """Count consecutive skipped steps; stop the run after train.max_bad_steps of them. Steps skipped on the
        device are counted there and checked at the next step that reads the host."""
        t = self.cfg.train
        if out["applied"] is None:
            return
        bad, peak = int(self.bad_t.item()), int(self.bad_peak_t.item())
        self.bad_peak_t = self.bad_t.clone()
        if not out["applied"]:
            self.log(f"warning: step {self.step}: non-finite loss/grad ({float(out['loss'])}); step skipped "
                     f"({bad} in a row)")
        if peak >= t.max_bad_steps:
            raise TrainingError(f"{peak} consecutive steps with non-finite loss (train.max_bad_steps="
                                f"{t.max_bad_steps}); lower train.lr or check the data")

    # ------------------------------------------------------------------ cadence
    def benchmark(self, step: int) -> None:
        """eval.tasks (lm-evaluation-harness) on the model gathered the way checkpoints are; task/metric values go to
        metrics.jsonl and wandb. Collective: every rank calls it, rank 0 scores (llmforge.inference.benchmarks)."""
        from llmforge.inference.benchmarks import run_tasks_in_training
        if self.tokenizer is None:
            import sentencepiece as spm
            self.tokenizer = spm.SentencePieceProcessor(model_file=self.plan.tok_path)
        row = run_tasks_in_training(self.engine.model_parts(), self.plan.margs, self.tokenizer, self.cfg.eval,
                                    self.cfg.run_dir, self.device)
        self.metrics.log({"step": step, **row})

    def after_step(self, out: dict, dt: float) -> None:
        if self.is_log_step(self.step):
            norm = out["norm"]
            grad_norm = float(norm.item()) if norm is not None else self.engine.grad_norm()
            self.metrics.log({**self.step_metrics.row(self.step, float(out["loss"]), out["lr"], grad_norm,
                                                      self.samples, dt, skipped=not out["applied"]), **out["moe"]})
        if self.step in self.kill_steps:
            os.kill(os.getpid(), 9)
        for component in self.components:  # each decides whether this step is one of its own
            component.after_step(self.step)

    def preempted(self, signum: int) -> int:
        """Save at this step boundary and exit PREEMPTED_EXIT; rerunning resumes bit-identically."""
        self.checkpoints.save_now()
        self.metrics.close()
        self.log(f"stopped by {signal_name(signum)} after step {self.step}: checkpoint saved in "
                 f"{os.path.abspath(self.cfg.run_dir)}/checkpoints; rerun the same command to resume "
                 f"(exit status {PREEMPTED_EXIT})")
        return PREEMPTED_EXIT

    def state(self) -> TrainState:
        return TrainState(self.step, self.samples)

    # ------------------------------------------------------------------ the run
    def resume(self) -> bool:
        """Load the newest checkpoint when asked to; True when the run is already finished (idempotent rerun)."""
        if not self.cfg.checkpoint.resume:
            return False
        state = self.engine.load_latest(self.log)
        if state is None:
            return False
        self.step, self.samples = state.step, state.samples
        self.log(f"resumed from {state.path} (step {self.step}, {self.samples} samples consumed)")
        if self.step >= self.cfg.train.steps:
            self.log(f"run already finished at step {self.step} (train.steps={self.cfg.train.steps}): "
                     f"{os.path.abspath(self.cfg.run_dir)}")
            return True
        return False

    def fit(self) -> int:
        cfg = self.cfg
        if self.resume():
            return 0
        self.metrics = MetricsLogger(cfg.run_dir, self.rank, cfg.logging, to_dict(cfg), resume_step=self.step)
        t_last = time.perf_counter()
        while self.step < cfg.train.steps:
            out = self.train_step()
            self.step, self.samples = self.step + 1, self.samples + cfg.train.global_batch_size
            self.apply_policy(out)
            now = time.perf_counter()
            self.after_step(out, now - t_last)
            signum = self.stop_requested()
            if signum and self.step < cfg.train.steps:
                return self.preempted(signum)
            t_last = time.perf_counter()  # eval and checkpoint time is not step time
        for component in self.components:  # validation and benchmarks first: the final checkpoint comes last
            component.at_end(self.step)
        self.metrics.close()
        if self.rank == 0:
            png = plot_run(cfg.run_dir) if cfg.logging.plot else None
            if cfg.logging.plot and cfg.eval.tasks:
                from llmforge.inference.benchmarks import plot_benchmarks
                plot_benchmarks(cfg.run_dir)  # benchmarks.png, the loss plot's companion
            self.log(f"done: {self.step} steps ({self.engine.name}); run dir {os.path.abspath(cfg.run_dir)}"
                     + (f"; plot {png}" if png else ""))
        return 0


def signal_name(signum: int) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def take_run_dir_lock(run_dir: str, rank: int) -> RunLock | None:
    """Rank 0 takes the run_dir lock; every rank learns the outcome, so all refuse together (one line each)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except ConfigError as e:
            error = str(e)
    box = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])
    return lock


def run_training(cfg) -> int:
    """Plan (no collective, nothing written) → process group → run_dir lock and resume checks → engine → run files
    → the loop. A refused start leaves run_dir as it was."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    cls = engine_class(cfg.engine)
    cls.check_config(cfg)
    cfg = with_expanded_paths(cfg)  # a copy: `~` in the YAML file's paths (no shell expanded them)
    check_run_dir_owner(cfg.run_dir)  # the user's own folder: refused before the lock writes into it
    plan = plan_run(cfg, world, cls.resolve_layout)
    cfg = plan.config  # resolved (the model section of a start folder's shape): what config.yaml records
    if cfg.eval.tasks:  # lm-eval, tokenizer, task files and names: refused now, not at the first evaluation
        from llmforge.inference.benchmarks import check_training_tasks
        check_training_tasks(cfg.eval, plan.tok_path)
    stop = StopSignal().install()
    die_with_parent()
    lock = None
    try:
        info = init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
        lock = take_run_dir_lock(cfg.run_dir, info.rank)  # before reading run_dir: no other writer under us
        check_run_dir(cfg, plan, (lambda *a: print(*a, flush=True)) if info.rank == 0 else (lambda *a: None))
        engine = cls(cfg, plan, info)
        trainer = Trainer(cfg, plan, engine, info.rank, info.world_size, info.device)
        trainer.stop = stop
        active = f" ({engine.n_active:,} active)" if engine.n_active != engine.n_params else ""
        trainer.log(f"model {cfg.model.preset}: {engine.n_params:,} parameters{active} | {engine.describe()} | global batch "
                    f"{cfg.train.global_batch_size} seq = {cfg.train.global_batch_size * cfg.data.seq_len} tokens | "
                    f"{info.device.type}/{info.backend}")
        if cfg.sft.pack:  # checked by the run plan: SFT data
            from llmforge.data.sft import pack_summary
            trainer.log(pack_summary(plan.train_stream))
        if info.rank == 0:
            write_run_files(cfg, plan, engine)
        return trainer.fit()
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
