"""Load a training run dir for inference: ``load_run(RUN_DIR) -> LoadedRun(cfg, model, tokenizer, checkpoint, step)``.

Shared by ``llmforge.eval``, ``llmforge.generate`` and ``llmforge.export_hf``. The checkpoint is read with DCP
into one unsharded model in this process, so a checkpoint saved by any layout (DDP, FSDP2, TP, PP) loads: DCP
reshards by parameter name; a DeepSpeed run's tag is consolidated by checkpoint/deepspeed_weights.py. LoRA adapters
(``train.lora``) are loaded and merged into the weights. Every file (DCP's or DeepSpeed's) is checked against the
checkpoint's COMPLETE marker (sizes and content hashes) under a shared lock first: a damaged
checkpoint is skipped for the next older one with a warning naming the file (an explicit ``checkpoint`` is refused
naming it), and one a running training rotates away meanwhile is replaced by the newer one it saved. Problems
raise :class:`RunLoadError`, whose message is one printable line.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from llmforge.checkpoint.checkpointer import (CheckpointError, Checkpointer, CheckpointVanished, DamagedCheckpoint,
                                 list_checkpoints, load_newest)
from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.model.blocks import ModelArgs
from llmforge.model.presets import model_args
from llmforge.model.transformer import Transformer
from llmforge.core.safe_pickle import UnsafePickleError


class RunLoadError(RuntimeError):
    """A run dir that cannot be loaded (missing, no config, no complete checkpoint...): printed as one line."""


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: Transformer
    tokenizer: object | None      # sentencepiece.SentencePieceProcessor, or None when the run had no tokenizer
    checkpoint: str
    step: int

    def __iter__(self):  # (cfg, model, tokenizer, checkpoint) unpacking, as the brief's signature promises
        return iter((self.cfg, self.model, self.tokenizer, self.checkpoint))


def load_tokenizer(run_dir: str):
    path = os.path.join(run_dir, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=path)


def empty_model(args: ModelArgs, device="cpu") -> Transformer:
    """A model whose parameters will be overwritten by a checkpoint: built on meta (no random init of every
    weight, which matters for big presets), materialised, RoPE tables computed, tied weights re-tied."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    if args.tie_embeddings:  # to_empty may give each module its own tensor: tie again explicitly
        model.output.weight = model.tok_embeddings.weight
    model.init_weights()  # RoPE buffers (and a defined value for every weight, should a load skip one)
    return model


def ensure_process_group() -> None:
    """DCP and the checkpoint helpers use the process group API: give a plain process a world-1 gloo group."""
    if not dist.is_initialized():
        from llmforge.core.distributed import init_distributed
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID"):
            os.environ.pop(key, None)  # inference is one process, whatever launched it
        init_distributed("cpu", "gloo")


def run_config(run_dir: str, overrides: list[str] | None = None) -> RunConfig:
    if not os.path.isdir(run_dir):
        raise RunLoadError(f"run dir not found: {run_dir}")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise RunLoadError(f"{run_dir} has no config.yaml: not a llmforge run dir")
    return dataclasses.replace(load_config(RunConfig, path, overrides), run_dir=run_dir)  # the folder may have moved


def load_run(run_dir: str, overrides: list[str] | None = None, device: str | torch.device = "cpu",
             checkpoint: str | None = None, log=print) -> LoadedRun:
    """Config (+ dotted overrides), model with the newest complete checkpoint's weights, tokenizer."""
    cfg = run_config(run_dir, overrides)
    if cfg.engine == "deepspeed":  # DeepSpeed's own checkpoint format, consolidated with its utilities
        return _load_deepspeed_run(cfg, run_dir, device, checkpoint, log)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if checkpoint and not os.path.isdir(checkpoint):
        raise RunLoadError(f"--checkpoint {checkpoint}: not found")
    if not checkpoint and not list_checkpoints(ckpt_root):
        raise RunLoadError(f"no complete checkpoint under {ckpt_root} (train first, or the saves were interrupted)")
    tokenizer = load_tokenizer(run_dir)
    try:
        args = model_args(cfg.model, tokenizer.vocab_size() if tokenizer is not None else None)
    except ValueError as e:
        raise RunLoadError(f"{run_dir}/config.yaml: {e}") from None
    model = empty_model(args)
    lora = cfg.train.lora
    if lora.rank:  # the checkpoint holds the adapters beside the frozen weights: load both, then fold them in
        from llmforge.model.lora import add_adapters
        add_adapters(model, lora.rank, lora.alpha, lora.targets)
    ensure_process_group()
    path, state = _load_checkpoint(cfg, model, ckpt_root, checkpoint, log)
    if lora.rank:
        from llmforge.model.lora import merge
        merge(model)
    model.to(device).eval()
    return LoadedRun(cfg, model, tokenizer, path, int(state.get("step", 0)))


def _load_checkpoint(cfg, model, ckpt_root: str, checkpoint: str | None, log) -> tuple[str, dict]:
    """(path, trainer_state) of the explicit checkpoint or of the newest one that verifies, loaded into ``model``."""
    ck = Checkpointer(ckpt_root, rank=dist.get_rank())

    def load(path: str) -> dict:
        try:  # model weights only: a checkpoint's optimizer state is not needed for inference
            return ck.load(path, [model], [], load_optimizer=False, load_rng=False)
        except (DamagedCheckpoint, CheckpointVanished) as e:
            if checkpoint:
                raise _runtime(RunLoadError(f"--checkpoint {checkpoint}: {e}")) from None
            raise  # load_newest skips it (damaged) or lists again (vanished)
        # DCP raises several types (one a BaseException): name the checkpoint and the first line of the cause
        except (Exception, CheckpointException) as e:
            if isinstance(e, (UnsafePickleError, CheckpointError)):  # already one line naming the file; the
                raise _runtime(RunLoadError(str(e))) from None  # checkpoint's fault (crafted, garbled): exit 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunLoadError(f"cannot load {path} into model {cfg.model.preset}: {first}") from None
    if checkpoint:
        return checkpoint, load(checkpoint)
    skipped: list[str] = []  # said only once a checkpoint loads: a refusal's one line already names every one
    try:
        path, state = load_newest(ckpt_root, load, skipped.append)
    except CheckpointError as e:
        raise _runtime(RunLoadError(str(e))) from None
    if path is None:  # the one line names why each listed checkpoint is incomplete
        raise RunLoadError(f"no complete checkpoint under {ckpt_root} (train first, or the saves were interrupted): "
                           + "; ".join(line.removeprefix("warning: skipping checkpoint ") for line in skipped))
    for line in skipped:
        log(line)
    return path, state


def _runtime(e: RunLoadError) -> RunLoadError:
    e.exit_status = 1  # the run dir is fine, its checkpoints are not: a runtime error, not a usage error
    return e


def _model_for(cfg, run_dir: str):
    tokenizer = load_tokenizer(run_dir)
    try:
        args = model_args(cfg.model, tokenizer.vocab_size() if tokenizer is not None else None)
    except ValueError as e:
        raise RunLoadError(f"{run_dir}/config.yaml: {e}") from None
    return empty_model(args), tokenizer


def _load_deepspeed_run(cfg, run_dir: str, device, checkpoint: str | None, log) -> LoadedRun:
    """The newest DeepSpeed tag that verifies against its COMPLETE marker (checkpoint/deepspeed_weights.py), as for
    DCP checkpoints: a damaged one is skipped with a warning naming the file, an explicit one refused naming it."""
    from llmforge.checkpoint.deepspeed_weights import DeepSpeedLoadError, load_into
    model, tokenizer = _model_for(cfg, run_dir)
    ensure_process_group()  # verification is collective
    try:
        path, step = load_into(model, os.path.join(run_dir, "checkpoints"), checkpoint, log)
    except DeepSpeedLoadError as e:  # unreadable, damaged, or a crafted file refused: the checkpoint's fault, exit 1
        raise _runtime(RunLoadError(str(e))) from None
    model.to(device).eval()
    return LoadedRun(cfg, model, tokenizer, path, step)


def run_cli(body) -> int:
    """Run an inference CLI's body: expected failures (no run, no checkpoint, bad option...) become one
    ``error:`` line and exit status 2, or 1 for errors that carry ``exit_status`` 1 (damaged checkpoints); a traceback
    only with LLMFORGE_DEBUG=1; the process group is torn down."""
    from llmforge.core.distributed import destroy
    try:
        return body()
    except (RunLoadError, ConfigError, FileNotFoundError, ValueError, OSError) as e:
        if os.environ.get("LLMFORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    finally:
        destroy()
