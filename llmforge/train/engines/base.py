"""The contract between the one training loop (``llmforge.train.trainer.Trainer``) and an engine.

The Trainer owns the loop: schedule, cadence (log, eval, checkpoint), the non-finite-step policy, metrics and
fault hooks. An engine owns the model and optimizer: how a step's forward/backward runs, how gradients are
clipped and applied, validation, and the checkpoint format. ``native`` (PyTorch FSDP2/DTensor/pipelining, DCP)
and ``deepspeed`` implement it; nothing else in the loop differs between them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


class TrainingError(RuntimeError):
    """A run that cannot continue (too many NaN steps, no checkpoint loads, ...): printed as one line."""


@dataclass(frozen=True)
class TrainState:
    """What the loop needs to continue a run exactly, saved with every checkpoint: optimizer steps done and
    samples consumed (the data position). ``path``: the checkpoint a loaded state came from."""
    step: int
    samples: int
    path: str | None = None

    def to_checkpoint(self) -> dict:
        """The form stored in a checkpoint (DCP's trainer state, DeepSpeed's client_state)."""
        return {"step": self.step, "samples": self.samples}

    @classmethod
    def from_checkpoint(cls, saved: dict, path: str) -> "TrainState":
        return cls(int(saved["step"]), int(saved["samples"]), path)


class Engine(abc.ABC):
    """Built after the process group exists; every method but ``write_run_files`` (rank 0 only) is called on every
    rank at the same point."""
    name: str = "engine"
    dp_rank: int = 0            # index of this rank's slice of the global batch
    n_params: int = 0
    n_active: int = 0  # parameters one token uses (MoE: k of the routed experts); n_params for a dense model
    flops_per_token: float = 0.0
    fp8_flops_per_token: float = 0.0  # the part of flops_per_token in float8 linears (MFU against a blended peak)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, before anything starts, config keys this engine cannot honour (ConfigError naming the key)."""

    @staticmethod
    @abc.abstractmethod
    def resolve_layout(cfg, world: int, margs) -> tuple[object, int, int | None]:
        """The engine's layout rules, checked without any collective: (layout, data-parallel size, the micro batch
        the layout fixes or None for train.micro_batch_size)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One startup line: the layout and what the engine chose."""

    def write_run_files(self, run_dir: str) -> None:
        """Rank 0, before training: engine-specific files beside config.yaml (none by default)."""

    @abc.abstractmethod
    def set_lr(self, lr: float) -> float:
        """Apply the trainer's learning rate for the next step; return the rate actually used."""

    @abc.abstractmethod
    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's local batch (tokens, shape [local, seq+1]); return the loss
        averaged over the global batch, identical on every rank (a 0-dim tensor, not synchronised to host)."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        """Global gradient norm before clipping (clips when max_norm > 0). None when the engine can only clip
        inside its optimizer step (then ``grad_norm`` gives the norm after ``optim_step``)."""

    @abc.abstractmethod
    def optim_step(self, apply: bool) -> bool:
        """Apply the update (or skip it when ``apply`` is False), then clear gradients. Returns whether the update
        was applied (an engine may veto one it finds non-finite)."""

    def optim_step_async(self, finite: torch.Tensor) -> bool:
        """Apply the update only where the 0-dim device flag ``finite`` is true, without reading it on the host.
        Returns False when this engine cannot (the Trainer then falls back to ``optim_step``)."""
        return False

    def grad_norm(self) -> float | None:
        """The norm of the last step when ``clip_grad_norm`` returned None."""
        return None

    @abc.abstractmethod
    def evaluate(self, valid, max_batches: int) -> tuple[float, int]:
        """Mean token cross-entropy over ``max_batches`` validation micro batches, and the token count."""

    @abc.abstractmethod
    def save(self, state: TrainState) -> None:
        """Write a checkpoint of step ``state.step`` carrying ``state``; atomic."""

    @abc.abstractmethod
    def load_latest(self, log) -> TrainState | None:
        """Resume from the newest loadable checkpoint: return the state saved with it, or None."""

    def model_parts(self) -> list:
        """This rank's model as parallelised parts (pipeline stages, FSDP/TP-sharded), for components that gather
        the whole model (in-training benchmarks). An engine that cannot refuses ``eval.tasks`` in check_config."""
        raise NotImplementedError(f"engine {self.name} does not expose its model parts")

    def wait(self) -> None:
        """Finish pending asynchronous work (async checkpoint saves)."""
