"""The one training loop, for every engine and layout.

``Trainer`` owns what is not engine-specific: the learning-rate schedule, the cadence of logging, evaluation and
checkpoints, the non-finite-step policy (skip the update, stop after ``train.max_bad_steps`` in a row), metrics,
resume bookkeeping and the reliability harness's fault hooks. The engine (``llmforge.engines``) owns forward/
backward, clipping, the optimizer step, validation and the checkpoint format.
"""
from __future__ import annotations

import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from llmforge.config import dump_config, to_dict
from llmforge.distributed import init_distributed
from llmforge.run_guard import PREEMPTED_EXIT, RunLock, StopSignal, check_run_dir, die_with_parent, write_fingerprint
from llmforge.engines.base import Engine, TrainingError
from llmforge.metrics import MetricsLogger, StepMetrics, plot_run
from llmforge.optim import lr_factor
from llmforge.run_plan import RunPlan, plan_run


def fault_steps(kind: str) -> set[int]:
    """Test hook for the reliability harness: LLMFORGE_FAULT="nan@3,4" or "kill@5" (never set in real runs)."""
    spec = os.environ.get("LLMFORGE_FAULT", "")
    if not spec.startswith(kind + "@"):
        return set()
    return {int(x) for x in spec.split("@", 1)[1].split(",") if x}


def engine_class(name: str):
    if name == "deepspeed":
        from llmforge.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine
    from llmforge.engines.native import NativeEngine
    return NativeEngine


def write_run_files(cfg, plan: RunPlan, engine: Engine) -> None:
    """Rank 0: the resolved config, the tokenizer the run trains with, the engine's own files."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    if plan.tok_path:
        tmp = os.path.join(cfg.run_dir, "tokenizer.model.tmp")
        shutil.copyfile(plan.tok_path, tmp)
        os.replace(tmp, os.path.join(cfg.run_dir, "tokenizer.model"))
    from llmforge.sft import copy_chat_template
    copy_chat_template(cfg.data.paths, cfg.run_dir)  # SFT data: generate / export_hf use it
    write_fingerprint(cfg, plan)
    engine.write_run_files(cfg.run_dir)


class Trainer:
    def __init__(self, cfg, plan: RunPlan, engine: Engine, rank: int, world: int, device):
        self.cfg, self.plan, self.engine, self.rank, self.device = cfg, plan, engine, rank, device
        self.log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
        self.step, self.samples, self.bad = 0, 0, 0
        self.step_metrics = StepMetrics(cfg.train.global_batch_size, cfg.data.seq_len, world,
                                        engine.flops_per_token, device)
        self.nan_steps, self.kill_steps = fault_steps("nan"), fault_steps("kill")
        self.metrics: MetricsLogger | None = None
        self.stop: StopSignal | None = None

    def stop_requested(self) -> int:
        """The signal number when any rank got SIGTERM/SIGUSR1 (agreed over all ranks: they stop at one step)."""
        if self.stop is None:
            return 0
        flag = torch.tensor(self.stop.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """Forward/backward, clip, apply or skip; return the step's numbers (host values only when logged)."""
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        lr = engine.set_lr(t.lr * lr_factor(self.step, t))
        local = self.plan.local_bs
        batch = self.plan.train_stream.batch(self.samples + engine.dp_rank * local, local)
        loss = engine.forward_backward(batch.to(self.device, non_blocking=True))
        if self.step + 1 in self.nan_steps:
            loss = loss * float("nan")
        norm = engine.clip_grad_norm(t.grad_clip)
        finite = bool(torch.isfinite(loss).item()) and (norm is None or bool(torch.isfinite(norm).item()))
        applied = engine.optim_step(apply=finite)
        grad_norm = float(norm.item()) if norm is not None else engine.grad_norm()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "applied": applied}

    def apply_policy(self, out: dict) -> None:
        """Count consecutive skipped steps; stop the run after train.max_bad_steps of them."""
        t = self.cfg.train
        if out["applied"]:
            self.bad = 0
            return
        self.bad += 1
        self.log(f"warning: step {self.step}: non-finite loss/grad ({float(out['loss'])}); step skipped "
                 f"({self.bad} in a row)")
        if self.bad >= t.max_bad_steps:
            raise TrainingError(f"{self.bad} consecutive steps with non-finite loss (train.max_bad_steps="
                                f"{t.max_bad_steps}); lower train.lr or check the data")

    # ------------------------------------------------------------------ cadence
    def evaluate_and_log(self, final: bool = False) -> None:
        vl, n = self.engine.evaluate(self.plan.valid, self.plan.eval_batches)
        row = {"step": self.step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50))}
        self.metrics.log(dict(row, val_tokens=n) if final else row)

    def after_step(self, out: dict, dt: float) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.step % t.log_interval == 0 or self.step == t.steps:
            self.metrics.log(self.step_metrics.row(self.step, float(out["loss"]), out["lr"], out["grad_norm"],
                                                   self.samples, dt, skipped=not out["applied"]))
        if self.step in self.kill_steps:
            os.kill(os.getpid(), 9)
        middle = self.step < t.steps
        if t.eval_interval and self.step % t.eval_interval == 0 and middle and self.plan.valid:
            self.evaluate_and_log()
        if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and middle:
            self.engine.save(self.step, self.state())

    def preempted(self, signum: int) -> int:
        """Save at this step boundary and exit PREEMPTED_EXIT; rerunning resumes bit-identically."""
        self.engine.save(self.step, self.state())
        self.engine.wait()
        self.metrics.close()
        self.log(f"stopped by {signal_name(signum)} after step {self.step}: checkpoint saved in "
                 f"{os.path.abspath(self.cfg.run_dir)}/checkpoints; rerun the same command to resume "
                 f"(exit status {PREEMPTED_EXIT})")
        return PREEMPTED_EXIT

    def state(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    # ------------------------------------------------------------------ the run
    def resume(self) -> bool:
        """Load the newest checkpoint when asked to; True when the run is already finished (idempotent rerun)."""
        if not self.cfg.checkpoint.resume:
            return False
        state = self.engine.load_latest(self.log)
        if state is None:
            return False
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.log(f"resumed from {state['path']} (step {self.step}, {self.samples} samples consumed)")
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
        if self.plan.valid:  # before the final save: once that checkpoint exists, metrics.jsonl is complete
            self.evaluate_and_log(final=True)
        self.engine.save(self.step, self.state())
        self.engine.wait()
        self.metrics.close()
        if self.rank == 0:
            png = plot_run(cfg.run_dir) if cfg.logging.plot else None
            self.log(f"done: {self.step} steps ({self.engine.name}); run dir {os.path.abspath(cfg.run_dir)}"
                     + (f"; plot {png}" if png else ""))
        return 0


def signal_name(signum: int) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_training(cfg) -> int:
    """Plan and run-dir checks (no collective, nothing written) → lock → process group → engine → run files →
    the loop. A refused start leaves run_dir as it was."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    cls = engine_class(cfg.engine)
    cls.check_config(cfg)
    plan = plan_run(cfg, world, cls.resolve_layout)
    lock = RunLock(cfg.run_dir).acquire() if rank0 else None  # before reading run_dir: no writer under us
    stop = StopSignal().install()
    die_with_parent()
    try:
        check_run_dir(cfg, plan, (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None))
        info = init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
        engine = cls(cfg, plan, info)
        trainer = Trainer(cfg, plan, engine, info.rank, info.world_size, info.device)
        trainer.stop = stop
        trainer.log(f"model {cfg.model.preset}: {engine.n_params:,} parameters | {engine.describe()} | global batch "
                    f"{cfg.train.global_batch_size} seq = {cfg.train.global_batch_size * cfg.data.seq_len} tokens | "
                    f"{info.device.type}/{info.backend}")
        if info.rank == 0:
            write_run_files(cfg, plan, engine)
        return trainer.fit()
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
