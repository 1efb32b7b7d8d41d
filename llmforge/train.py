"""Training entry point: ``[torchrun ...] python -m llmforge.train CONFIG.yaml [key=value ...]``.

Produces ``run_dir/config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/step_N`` and ``loss.png``.
The loop is the same for every layout: parallelism lives in ``llmforge.parallel`` and is applied from outside.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

from llmforge.checkpoint import Checkpointer, resume_candidates
from llmforge.config import ConfigError, RunConfig, dump_config, load_config, to_dict
from llmforge.data import find_tokenizer, validation_batches
from llmforge.distributed import LaunchError, collective_error, init_distributed, is_collective_failure
from llmforge.megatron_data import build_run_datasets
from llmforge.metrics import MetricsLogger, StepMetrics, plot_run
from llmforge.model.presets import OVERRIDABLE, model_args
from llmforge.model.transformer import Transformer, flops_per_token, num_params
from llmforge.optim import build_optimizer, lr_factor, set_lr
from llmforge.parallel import build_mesh, parallelize, resolve_dims

USAGE = "usage: python -m llmforge.train CONFIG.yaml [key=value ...]   (e.g. train.steps=20 parallel.tp=2)"


def _fault_steps(kind: str) -> set[int]:
    """Test hook for the reliability harness: LLMFORGE_FAULT="nan@3,4" or "kill@5" (never set in real runs)."""
    spec = os.environ.get("LLMFORGE_FAULT", "")
    if not spec.startswith(kind + "@"):
        return set()
    return {int(x) for x in spec.split("@", 1)[1].split(",") if x}


class TrainingError(RuntimeError):
    """A run that cannot continue (too many NaN steps, no data...): printed as one line."""


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def vocab_from_tokenizer(path: str | None) -> int | None:
    if path is None:
        return None
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=path).vocab_size()


def batch_plan(cfg, dp: int) -> tuple[int, int, int]:
    """(local batch per DP rank, micro batch, accumulation steps), checked against each other."""
    t = cfg.train
    local = t.global_batch_size // dp
    micro = t.micro_batch_size or local
    if local % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the per-rank batch {local} "
                          f"(global_batch_size {t.global_batch_size} / dp {dp})")
    accum = local // micro
    if t.grad_accum_steps and t.grad_accum_steps != accum:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} but global_batch_size / (micro_batch_size * dp)"
                          f" = {t.global_batch_size} / ({micro} * {dp}) = {accum}")
    return local, micro, accum


def resolve_dtype(cfg, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def resolve_model_args(cfg, tok_path: str | None):
    """The model shape: from the HF folder when train.init_from_hf is set, else preset + overrides + data vocab.
    With init_from_hf the resolved shape is written back into cfg.model, so config.yaml rebuilds this model."""
    if not cfg.train.init_from_hf:
        return model_args(cfg.model, vocab_from_tokenizer(tok_path))
    from llmforge.export_hf import hf_model_args
    margs = hf_model_args(cfg.train.init_from_hf)
    data_vocab = vocab_from_tokenizer(tok_path)
    if data_vocab and data_vocab > margs.vocab_size:
        raise ConfigError(f"train.init_from_hf: the data's tokenizer has {data_vocab} ids, the model {margs.vocab_size}")
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(margs, k) for k in OVERRIDABLE})
    return margs


def build_model(args, seed: int) -> Transformer:
    """Same seed → same initial weights on every rank and in every layout (the basis of equivalence tests)."""
    torch.manual_seed(seed)
    return Transformer(args)


def forward_backward(pm, inputs, targets, micro: int, accum: int, amp) -> torch.Tensor:
    """Run one optimizer step's worth of forward/backward; return the mean loss (valid on the last stage)."""
    if pm.schedule is not None:
        from llmforge.parallel.pipeline import pipeline_forward_backward
        return pipeline_forward_backward(pm, inputs, targets, amp)
    model = pm.parts[0]
    total = torch.zeros((), device=inputs.device)
    for i in range(accum):
        sl = slice(i * micro, (i + 1) * micro)
        sync = contextlib.nullcontext() if (not pm.ddp or i == accum - 1) else model.no_sync()
        fsdp_sync = pm.extras.get("set_sync")
        if fsdp_sync:
            fsdp_sync(i == accum - 1)
        with sync, amp():
            loss = loss_fn(model(inputs[sl]), targets[sl])
        (loss / accum).backward()
        total += loss.detach()
    return total / accum


def clip_grad_norm(pm, max_norm: float) -> torch.Tensor:
    clip = pm.extras.get("clip_grad_norm")
    if clip is not None:
        return clip(max_norm)
    params = [p for part in pm.parts for p in part.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def eval_batch_count(cfg, micro: int) -> int:
    """train.eval_batches global batches, scored in micro batches: the same windows in any layout and engine."""
    return cfg.train.eval_batches * cfg.train.global_batch_size // micro


@torch.no_grad()
def evaluate(pm, valid, micro: int, max_batches: int, device, amp) -> tuple[float, int]:
    """Mean token cross-entropy over the validation windows (every rank evaluates the same batches)."""
    evaluate_fn = pm.extras.get("evaluate")
    if evaluate_fn is not None:
        return evaluate_fn(valid, micro, max_batches, device, amp)
    model = pm.parts[0]
    model.eval()
    total, count = 0.0, 0
    for batch in validation_batches(valid, micro, max_batches):
        batch = batch.to(device)
        with amp():
            logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return (total / count if count else float("nan")), count


def train(cfg: RunConfig) -> int:
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    tok_path = find_tokenizer(cfg.data.paths)
    margs = resolve_model_args(cfg, tok_path)
    if cfg.data.seq_len > margs.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model max_seq_len={margs.max_seq_len}")
    dims = resolve_dims(cfg.parallel, world, margs, cfg.train, cfg.recompute, cfg.data.seq_len)  # before any collective
    local_bs, micro, accum = batch_plan(cfg, dims.dp)
    train_stream, valid = build_run_datasets(cfg, margs.vocab_size)  # data.backend: native | megatron

    info = init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    rank, device = info.rank, info.device
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        if tok_path:
            shutil.copyfile(tok_path, os.path.join(cfg.run_dir, "tokenizer.model.tmp"))
            os.replace(os.path.join(cfg.run_dir, "tokenizer.model.tmp"), os.path.join(cfg.run_dir, "tokenizer.model"))
    mesh, dp_mesh = build_mesh(dims, device.type, cfg.dist.timeout_s)
    dtype = resolve_dtype(cfg, device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if (
        dtype == torch.bfloat16 and not cfg.parallel.zero_stage in (2, 3)) else contextlib.nullcontext

    model = build_model(margs, cfg.seed)
    if cfg.train.init_from_hf:  # before parallelize(); resuming a checkpoint later overwrites these weights
        from llmforge.export_hf import load_hf_into
        load_hf_into(model, cfg.train.init_from_hf)
    n_params, fpt = num_params(model), flops_per_token(model, cfg.data.seq_len)
    log(f"model {cfg.model.preset}: {n_params:,} parameters | layout pp{dims.pp} x dp_replicate{dims.dp_replicate}"
        f" x dp_shard{dims.dp_shard} x tp{dims.tp} (zero_stage {cfg.parallel.zero_stage}) | global batch "
        f"{cfg.train.global_batch_size} seq = {cfg.train.global_batch_size * cfg.data.seq_len} tokens, micro {micro}"
        f" per rank, {accum} accumulation steps" + (f" | {cfg.parallel.pp_schedule}, {dims.pp_microbatches} "
        f"microbatches" if dims.pp > 1 else "") + f" | {device.type}/{info.backend}")
    pm = parallelize(model, dims, mesh, cfg, device, loss_fn)
    del model  # pipeline stages are copies: do not keep the whole model alive
    optimizers = pm.extras.get("optimizers") or [build_optimizer([part], cfg.train, device) for part in pm.parts]

    ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep, cfg.checkpoint.async_save, rank)
    step, samples, bad = 0, 0, 0
    resume_path, candidates = None, (resume_candidates(ckpt.root, log) if cfg.checkpoint.resume else [])
    for path in candidates:  # newest first; one that fails to load is reported and the next older one tried
        try:
            state = ckpt.load(path, pm.parts, optimizers)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            log(f"warning: cannot load checkpoint {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
            continue
        resume_path, step, samples = path, state["step"], state["samples"]
        log(f"resumed from {resume_path} (step {step}, {samples} samples consumed)")
        break
    if candidates and resume_path is None:
        raise TrainingError(f"cannot resume: no checkpoint in {ckpt.root} loads ({', '.join(candidates)}); "
                            "move them away to start over")
    if resume_path and step >= cfg.train.steps:  # rerunning a finished run changes nothing (idempotent)
        log(f"run already finished at step {step} (train.steps={cfg.train.steps}): {os.path.abspath(cfg.run_dir)}")
        return 0
    metrics = MetricsLogger(cfg.run_dir, rank, cfg.logging, to_dict(cfg), resume_step=step)
    step_metrics = StepMetrics(cfg.train.global_batch_size, cfg.data.seq_len, dims.world_size, fpt, device)
    dp_rank = dp_mesh.get_local_rank()
    G = cfg.train.global_batch_size
    eval_batches = eval_batch_count(cfg, micro)
    loss_group = pm.extras.get("loss_group")  # pp group: the loss lives on the last stage
    nan_steps, kill_steps = _fault_steps("nan"), _fault_steps("kill")
    t_last = time.perf_counter()
    while step < cfg.train.steps:
        lr = cfg.train.lr * lr_factor(step, cfg.train)
        for opt in optimizers:
            set_lr(opt, lr)
        batch = train_stream.batch(samples + dp_rank * local_bs, local_bs).to(device)
        loss = forward_backward(pm, batch[:, :-1], batch[:, 1:], micro, accum, amp)
        if pm.extras.get("finish_grads"):  # gradient all-reduce where DDP does not apply (TP/PP layouts)
            pm.extras["finish_grads"]()
        loss = loss if pm.is_last else torch.zeros((), device=device)
        if step + 1 in nan_steps:
            loss = loss * float("nan")
        if loss_group is not None:
            dist.all_reduce(loss, group=loss_group)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp_mesh.get_group())
        grad_norm = clip_grad_norm(pm, cfg.train.grad_clip)
        loss_val, finite = loss.item(), bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item())
        if finite:
            for opt in optimizers:
                opt.step()
            bad = 0
        else:
            bad += 1
            log(f"warning: step {step + 1}: non-finite loss/grad ({loss_val}); step skipped ({bad} in a row)")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step, samples = step + 1, samples + G
        if bad >= cfg.train.max_bad_steps:
            raise TrainingError(f"{bad} consecutive steps with non-finite loss (train.max_bad_steps="
                                f"{cfg.train.max_bad_steps}); lower train.lr or check the data")
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
            metrics.log(step_metrics.row(step, loss_val, lr, grad_norm.item(), samples, dt, skipped=not finite))
        if step in kill_steps:
            os.kill(os.getpid(), 9)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.steps and valid:
            vl, _ = evaluate(pm, valid, micro, eval_batches, device, amp)
            metrics.log({"step": step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50))})
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.steps:
            ckpt.save(step, pm.parts, optimizers, {"step": step, "samples": samples})
        t_last = time.perf_counter()  # eval and checkpoint time is not step time
    if valid:  # before the final save: once that checkpoint exists, metrics.jsonl is complete
        vl, n = evaluate(pm, valid, micro, eval_batches, device, amp)
        metrics.log({"step": step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50)), "val_tokens": n})
    ckpt.save(step, pm.parts, optimizers, {"step": step, "samples": samples})
    ckpt.wait()
    metrics.close()
    if rank == 0:
        png = plot_run(cfg.run_dir) if cfg.logging.plot else None
        log(f"done: {step} steps; run dir {os.path.abspath(cfg.run_dir)}" + (f"; plot {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    try:
        cfg = load_config(RunConfig, argv[0], argv[1:])
        if cfg.engine == "deepspeed":
            from llmforge.engines.deepspeed import train as ds_train
            return ds_train(cfg)
        return train(cfg)
    except (ConfigError, LaunchError, TrainingError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LLMFORGE_DEBUG"):
            raise
        if rank0 or not isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # a failed/timed-out collective: gloo and NCCL do not say which rank saw it
        if os.environ.get("LLMFORGE_DEBUG") or not dist.is_initialized() or not is_collective_failure(e):
            raise
        print(f"error: {collective_error(e)}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
