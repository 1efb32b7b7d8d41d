"""The parts of a run that work on a cadence, each deciding for itself when it runs (as torchtitan's checkpointer
and validator do): ``Validation`` (train.eval_interval, and at the end), ``Benchmarks`` (eval.tasks every
eval.interval or train.eval_interval steps, and at the end) and ``Checkpoints`` (checkpoint.interval, at the end,
and at a preemption). The Trainer calls ``after_step(step)`` on each after every optimizer step and ``at_end(step)``
once the last step is done, in its list's order; a component given nothing to do is a no-op.
"""
from __future__ import annotations

import math
from typing import Callable

from .engines.base import Engine, TrainState


def _every(interval: int, step: int, steps: int) -> bool:
    """Every ``interval`` steps before the last one (the last step is the end of the run's business)."""
    return bool(interval) and step % interval == 0 and step < steps


class Validation:
    """Validation loss / perplexity on the plan's held-out windows (the same windows in every layout)."""

    def __init__(self, engine: Engine, valid, eval_batches: int, interval: int, steps: int,
                 log_row: Callable[[dict], None]):
        self.engine, self.valid, self.eval_batches = engine, valid, eval_batches
        self.interval, self.steps, self.log_row = interval, steps, log_row

    def after_step(self, step: int) -> None:
        if self.valid and _every(self.interval, step, self.steps):
            self.run(step)

    def at_end(self, step: int) -> None:
        if self.valid:  # before the final save: once that checkpoint exists, metrics.jsonl is complete
            self.run(step, final=True)

    def run(self, step: int, final: bool = False) -> None:
        vl, n = self.engine.evaluate(self.valid, self.eval_batches)
        row = {"step": step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50))}
        self.log_row(dict(row, val_tokens=n) if final else row)


class Benchmarks:
    """eval.tasks through lm-eval on the model as it trains (``score(step)`` gathers and scores; collective)."""

    def __init__(self, tasks: list, interval: int, steps: int, score: Callable[[int], None]):
        self.enabled, self.interval, self.steps, self.score = bool(tasks), interval, steps, score

    def after_step(self, step: int) -> None:
        if self.enabled and _every(self.interval, step, self.steps):
            self.score(step)

    def at_end(self, step: int) -> None:
        if self.enabled:
            self.score(step)


class Checkpoints:
    """The engine's checkpoint of the loop's state (``state()``): every checkpoint.interval steps, always at the
    end and at a preemption."""

    def __init__(self, engine: Engine, interval: int, steps: int, state: Callable[[], TrainState]):
        self.engine, self.interval, self.steps, self.state = engine, interval, steps, state

    def after_step(self, step: int) -> None:
        if _every(self.interval, step, self.steps):
            self.engine.save(self.state())

    def at_end(self, step: int) -> None:
        self.save_now()

    def save_now(self) -> None:
        """Save and wait for the write to finish (the end of the run, a preemption)."""
        self.engine.save(self.state())
        self.engine.wait()
