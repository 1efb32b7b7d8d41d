"""``engine: native`` — PyTorch's own parallelism: DDP / ZeRO-1 / FSDP2 (ZeRO-2/3, HSDP), DTensor TP + SP,
torch.distributed.pipelining, activation recomputation, torch.compile; DCP checkpoints that reshard."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from llmforge.checkpoint.checkpointer import Checkpointer, NoUsableCheckpoint, resume_candidates
from llmforge.core.distributed import device_type, resolve_dtype
from llmforge.core.loss import loss_fn, split_batch
from llmforge.core.packing import batch_positions
from llmforge.model.transformer import Transformer, flops_per_token, num_params
from llmforge.core.muon import describe_split
from llmforge.core.optim import build_optimizer, set_lr
from llmforge.parallel import build_mesh, resolve_dims
from llmforge.parallel.build import build_parallel_model, meta_model
from llmforge.parallel.float8 import (check_float8_device, check_float8_targets, describe_float8,
                                      float8_flops_per_token)
from llmforge.core.safe_pickle import UnsafePickleError

from .base import Engine, TrainState


def build_model(args, seed: int) -> Transformer:
    """The unsharded model with the weights every layout starts from (llmforge.parallel.build's init)."""
    from llmforge.parallel.build import build_model as build_full
    torch.manual_seed(seed)
    return build_full(args, seed)


def autocast_for(cfg, device: torch.device):
    """bf16 autocast where the parameters stay fp32 (FSDP2 casts parameters itself under ZeRO-2/3)."""
    if resolve_dtype(cfg.train.dtype, device) == torch.bfloat16 and cfg.parallel.zero_stage not in (2, 3):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class NativeEngine(Engine):
    name = "native"

    @classmethod
    def check_config(cls, cfg) -> None:
        check_float8_device(cfg, device_type(cfg.dist.device))  # the dry run models a GPU: not there

    @staticmethod
    def resolve_layout(cfg, world: int, margs):
        """Native layout rules (llmforge.parallel.resolve_dims); no collective."""
        dims = resolve_dims(cfg.parallel, world, margs, cfg.train, cfg.recompute, cfg.data.seq_len)
        check_float8_targets(cfg, margs)  # float8 with nothing to convert (also in the dry run)
        return dims, dims.dp, None

    def __init__(self, cfg, plan, info):
        self.cfg, self.plan, self.device, self.rank = cfg, plan, info.device, info.rank
        self.dims = dims = plan.layout
        self.mesh, self.dp_mesh = build_mesh(dims, info.device.type, cfg.dist.timeout_s)
        self.amp = autocast_for(cfg, info.device)
        from llmforge.core.loss import MaskedLoss
        from llmforge.data.sft import is_sft_data
        # SFT data: response-only loss normalised by the global batch's response tokens (llmforge/core/loss.py)
        self.sft_loss = MaskedLoss() if is_sft_data(cfg.data.paths) else None
        self.loss_fn = self.sft_loss or loss_fn
        # built on the meta device; each rank materialises only its shards (init_from_hf is read into them;
        # resuming a checkpoint later overwrites them)
        self.pm = build_parallel_model(plan.margs, dims, self.mesh, cfg, info.device, self.loss_fn, cfg.train.init_from_hf)
        if cfg.train.init_from:  # fine-tuning start (a resumed checkpoint later overwrites these weights)
            from llmforge.train.init_from import load_init_weights
            load_init_weights(self.pm.parts, cfg.train.init_from)
        meta = meta_model(plan.margs)  # shapes only: counts without memory
        self.n_params, self.flops_per_token = num_params(meta), flops_per_token(meta, cfg.data.seq_len)
        self.n_active = num_params(meta, active=True)
        self.fp8_flops_per_token = float8_flops_per_token(cfg, plan.margs)
        self.optimizers = self.pm.zero1_optimizers or [build_optimizer([p], cfg.train, info.device) for p in self.pm.parts]
        self.dp_rank = self.dp_mesh.get_local_rank()  # the cp ranks of one dp rank read the same samples
        self.loss_avg_group = (self.mesh["dp_cp"] if dims.cp > 1 else self.dp_mesh).get_group()
        self.ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep,
                                 cfg.checkpoint.async_save, info.rank)

    def describe(self) -> str:
        d, p = self.dims, self.plan
        return (f"layout pp{d.pp} x dp_replicate{d.dp_replicate} x dp_shard{d.dp_shard}"
                + (f" x cp{d.cp}" if d.cp > 1 else "") + f" x tp{d.tp} (zero_stage "
                f"{self.cfg.parallel.zero_stage})" + (f" | {self.cfg.parallel.pp_schedule}, {d.pp_microbatches} "
                f"microbatches" if d.pp > 1 else "") + f" | micro {p.micro} per rank, {p.accum} accumulation steps"
                + (f" | {describe_split(self.pm.parts)}" if self.cfg.train.optimizer == "muon" else "")
                + (f" | {describe_float8(self.pm.parts)}" if self.cfg.train.float8 else ""))

    def set_lr(self, lr: float) -> float:
        for opt in self.optimizers:
            set_lr(opt, lr)
        return lr

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        pm, p = self.pm, self.plan
        # masked tokens are stored as -1 - id, document starts marked (llmforge.core.loss.split_batch)
        inputs, targets = split_batch(batch)
        positions = batch_positions(batch) if self.cfg.data.document_mask or self.cfg.sft.pack else None
        if self.sft_loss is not None:  # every cp rank counts the whole sequences: gradients average over cp too
            self.sft_loss.prepare(targets, self.dp_mesh.get_group(),
                                  self.dims.pp_microbatches if pm.schedule is not None else p.accum, self.dims.cp)
        loss = pm.forward_backward(inputs, targets, p.micro, p.accum, self.amp, self.loss_fn, positions)
        pm.finish_grads()
        loss = loss if pm.is_last else torch.zeros((), device=self.device)
        if pm.loss_group is not None:  # the loss lives on the last pipeline stage
            dist.all_reduce(loss, group=pm.loss_group)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=self.loss_avg_group)  # cp ranks hold parts of it
        return loss

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = self.pm.clip_grad_norm(max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optim_step(self, apply: bool) -> bool:
        for opt in self.optimizers:
            if apply:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return apply

    def optim_step_async(self, finite: torch.Tensor) -> bool:
        """Fused AdamW skips its update on the device when ``found_inf`` is set (as under GradScaler)."""
        if not all(isinstance(o, torch.optim.Adam) and o.defaults.get("fused") for o in self.optimizers):
            return False
        skip = (~finite).float()
        for opt in self.optimizers:
            opt.found_inf = skip
            opt.step()
            del opt.found_inf
            opt.zero_grad(set_to_none=True)
        return True

    def model_parts(self) -> list:
        return self.pm.parts

    def evaluate(self, valid, max_batches: int) -> tuple[float, int]:
        return self.pm.evaluate(valid, self.plan.micro, max_batches, self.device, self.amp)

    def save(self, state: TrainState) -> None:
        self.ckpt.save(state.step, self.pm.parts, self.optimizers, state.to_checkpoint())

    def load_latest(self, log) -> TrainState | None:
        candidates, reasons = resume_candidates(self.ckpt.root, log), []
        for path in candidates:  # newest first; one that fails to load is reported and the next older one tried
            state, failed = None, None
            try:
                state = self.ckpt.load(path, self.pm.parts, self.optimizers)
            except UnsafePickleError as e:  # a crafted file is refused (exit 1, naming it), never skipped
                failed = ("crafted", str(e))
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                failed = ("failed", (str(e).strip().splitlines() or [type(e).__name__])[0])
            # one rank's own file (its RNG state) may fail alone: every rank takes the same decision, or they part
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, failed)
            found = sorted(f for f in gathered if f)  # "crafted" sorts first
            if found and found[0][0] == "crafted":
                refused = UnsafePickleError(found[0][1])
                refused.every_rank = True  # every rank raises it: llmforge.train prints it once
                raise refused
            if found:
                why = found[0][1]
                log(f"warning: cannot load checkpoint {path}: {why}")
                reasons.append(why if path in why else f"{path}: {why}")  # the error line names each file
                continue
            return TrainState.from_checkpoint(state, path)
        if candidates:
            raise NoUsableCheckpoint(f"cannot resume: no checkpoint in {self.ckpt.root} loads "  # exit 1, nothing removed
                                     f"({'; '.join(reasons)}); move them away to start over")
        return None

    def wait(self) -> None:
        self.ckpt.wait()
