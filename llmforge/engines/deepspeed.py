"""``engine: deepspeed`` — the same model, data stream, metrics rows and run dir as the native loop, trained by
``deepspeed.initialize`` with a config generated from ours and the raw ``deepspeed:`` dict merged on top.

Generated: ZeRO stage (``parallel.zero_stage``), train_batch_size / micro batch / accumulation (``train.*``,
derived as in the native loop), gradient_clipping, bf16 when the train dtype resolves to bf16, and a client
torch AdamW with our decay/no-decay groups whose LR follows our schedule (set every step, so it is exact after a
resume). Giving ``deepspeed.optimizer`` (or CPU offload: ``deepspeed.zero_optimization.offload_optimizer.device=
cpu``) switches to DeepSpeed's own optimizer (FusedAdam / DeepSpeedCPUAdam) with the same hyper-parameters;
``deepspeed.scheduler`` replaces our schedule. ``parallel.pp > 1`` trains through DeepSpeed's PipelineModule
(embedding | blocks | norm+head, ZeRO 0/1 only, as DeepSpeed requires).

Checkpoints: ``run_dir/checkpoints/step_N`` written by ``save_checkpoint``; the ``latest`` file, rewritten
atomically after every rank finished, is the commit point; auto-resume loads it (model, optimizer, step,
samples consumed). Launch: ``deepspeed --num_gpus N --no_local_rank --module llmforge.train CONFIG engine=
deepspeed`` (or torchrun / srun: the process group comes from llmforge.distributed either way).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from llmforge import train as T
from llmforge.config import ConfigError, dump_config, to_dict
from llmforge.data import find_tokenizer
from llmforge.megatron_data import build_run_datasets
from llmforge.distributed import init_distributed
from llmforge.metrics import MetricsLogger, StepMetrics, plot_run
from llmforge.model.presets import model_args
from llmforge.model.transformer import flops_per_token, num_params
from llmforge.optim import lr_factor, param_groups
from llmforge.parallel import ParallelModel

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the feature configs it delegates to).
KNOWN_KEYS = set("""
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print dump_state
    disable_allgather communication_data_type seq_parallel_communication_data_type prescale_gradients
    gradient_predivide_factor sparse_gradients zero_optimization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer fp16 bf16 bfloat16 amp torch_autocast gradient_clipping graph_harvesting optimizer
    scheduler wall_clock_breakdown memory_breakdown flops_profiler activation_checkpointing aio tensorboard wandb
    csv_monitor comet comms_logger eigenvalue progressive_layer_drop pld curriculum_learning data_efficiency
    elasticity pipeline checkpoint data_types sparse_attention compression_training weight_quantization
    quantize_training hybrid_engine autotuning nebula compile timers dataloader_drop_last
    use_data_before_expert_parallelism use_node_local_storage load_universal_checkpoint zero_quantized_weights
    zero_quantized_gradients fp32_allreduce mics_shard_size mics_hierarchical_params_gather domino tensor_parallel
    gradient_accumulation_dtype disable_python_gc expert_parallel gradient_allreduce_op log_level
    managed_gradient_accumulation vocabulary_size""".split())
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
PREFIX = "deepspeed."


def ds_dims(cfg, world: int) -> tuple[int, int]:
    """(pipeline stages, data-parallel size) for DeepSpeed; ConfigError before any collective."""
    p = cfg.parallel
    if p.tp > 1:
        raise ConfigError(f"parallel.tp={p.tp}: the deepspeed engine has no tensor parallelism for this model; "
                          "use engine=native for TP")
    if world % p.pp:
        raise ConfigError(f"world size {world} is not divisible by parallel.pp={p.pp}")
    dp = world // p.pp
    if p.dp_replicate != -1 and p.dp_replicate * p.dp_shard != dp:
        raise ConfigError(f"world size {world} != parallel.pp*dp_replicate*dp_shard = {p.pp}*{p.dp_replicate}*"
                          f"{p.dp_shard}; change the process count or the parallel.* sizes")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed pipeline "
                          "parallelism supports ZeRO stage 0 or 1 only")
    if cfg.train.global_batch_size % dp:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
                          f"data-parallel size {dp}")
    return p.pp, dp


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _offload(conf: dict) -> bool:
    z = conf.get("zero_optimization", {})
    return any(isinstance(z.get(k), dict) and z[k].get("device", "none") in ("cpu", "nvme")
               for k in ("offload_optimizer",))


def ds_config(cfg, world: int, dtype: torch.dtype = torch.float32) -> dict:
    """DeepSpeed config generated from ours with ``cfg.deepspeed`` merged on top, validated."""
    raw = cfg.deepspeed or {}
    unknown = [k for k in raw if k not in KNOWN_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KNOWN_KEYS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown DeepSpeed config key '{PREFIX}{unknown[0]}'{hint}")
    pp, dp = ds_dims(cfg, world)
    _, micro, accum = T.batch_plan(cfg, dp)
    t = cfg.train
    conf = {
        "train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch.optim.AdamW
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    for k in BATCH_KEYS:
        if k in raw and raw[k] != conf[k]:
            raise ConfigError(f"{PREFIX}{k}={raw[k]} conflicts with train.* ({k}={conf[k]} from global_batch_size="
                              f"{t.global_batch_size}, micro_batch_size, dp={dp}); set train.* instead")
    merged = _merge(conf, raw)
    stage = merged["zero_optimization"].get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{PREFIX}zero_optimization.stage={stage!r} is not 0, 1, 2 or 3")
    if pp > 1 and stage > 1:
        raise ConfigError(f"{PREFIX}zero_optimization.stage={stage} with parallel.pp={pp}: DeepSpeed pipeline "
                          "parallelism supports ZeRO stage 0 or 1 only")
    if _offload(merged) and stage == 0:
        raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer needs parallel.zero_stage >= 1")
    if _offload(merged) and "optimizer" not in merged:  # offload needs DeepSpeed's CPU Adam: same hyper-parameters
        merged["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                           "weight_decay": t.weight_decay}}
    return merged


# ------------------------------------------------------------------------------------------ pipeline stages
class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tok_embeddings, self.pos_embeddings = model.tok_embeddings, model.pos_embeddings

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(tokens.shape[1], device=h.device))
        return h


class _Block(nn.Module):
    def __init__(self, block, model):
        super().__init__()
        self.block, self.rope = block, model.args.family != "gpt2"
        self.register_buffer("cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("sin", model.rope_sin.clone(), persistent=False)

    def forward(self, h):
        n = h.shape[1]
        return self.block(h, self.cos[:n], self.sin[:n]) if self.rope else self.block(h)


class _Head(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, h):
        return self.output(self.norm(h))


def pipeline_module(model, pp: int):
    from deepspeed.pipe import PipelineModule
    layers = [_Embed(model), *[_Block(b, model) for b in model.layers.values()], _Head(model)]
    module = PipelineModule(layers=layers, num_stages=pp, loss_fn=T.loss_fn, partition_method="uniform")
    # DeepSpeed sums gradient norms over the stages of a pipeline only for parameters marked model-parallel
    # (Megatron's attribute); unmarked ones count on stage 0 alone, which clips with a wrong norm. Every
    # parameter here lives on exactly one stage, so the mark is true.
    for p in module.parameters():
        p.model_parallel = True
    return module


# ------------------------------------------------------------------------------------------ checkpoints
def _latest(root: str) -> str | None:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(root, tag)) else None


def save(engine, root: str, step: int, state: dict, keep: int, rank: int) -> None:
    tag = f"step_{step:08d}"
    engine.save_checkpoint(root, tag=tag, client_state=dict(state), save_latest=False)
    dist.barrier()
    if rank == 0:  # the commit point: `latest` names a tag only once every rank has written its part
        tmp = os.path.join(root, f"latest.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, "latest"))
        steps = sorted((d for d in os.listdir(root) if re.match(r"^step_\d+$", d)), reverse=True)
        for old in steps[steps.index(tag) + keep:] if tag in steps else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()


def resume(engine, root: str, rank: int, log) -> tuple[int, int, str | None]:
    tag = [_latest(root) if rank == 0 else None]
    dist.broadcast_object_list(tag, src=0)
    if tag[0] is None:
        return 0, 0, None
    if rank == 0:  # step dirs newer than `latest` are interrupted saves
        for d in os.listdir(root):
            if re.match(r"^step_\d+$", d) and d > tag[0]:
                log(f"warning: removing interrupted DeepSpeed checkpoint {os.path.join(root, d)}")
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()
    path, client = engine.load_checkpoint(root, tag=tag[0])
    if path is None:
        raise T.TrainingError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag[0])}")
    return int(client["step"]), int(client["samples"]), os.path.join(root, tag[0])


# ------------------------------------------------------------------------------------------ the loop
def train(cfg) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    tok_path = find_tokenizer(cfg.data.paths)
    margs = model_args(cfg.model, T.vocab_from_tokenizer(tok_path))
    pp, dp = ds_dims(cfg, world)
    if pp > 1 and margs.tie_embeddings:
        raise ConfigError("parallel.pp>1 needs untied embeddings (model.tie_embeddings=false)")
    local_bs, micro, accum = T.batch_plan(cfg, dp)
    stream, valid = build_run_datasets(cfg, margs.vocab_size)  # data.backend: native | megatron

    info = init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    for k, v in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank)):
        os.environ.setdefault(k, str(v))  # DeepSpeed reads these (plain python / srun leave some unset)
    deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)
    rank, device = info.rank, info.device
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    dtype = T.resolve_dtype(cfg, device)
    conf = ds_config(cfg, world, dtype)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        tmp = os.path.join(cfg.run_dir, "deepspeed_config.json.tmp")
        json.dump(conf, open(tmp, "w"), indent=1)
        os.replace(tmp, os.path.join(cfg.run_dir, "deepspeed_config.json"))
        if tok_path:
            shutil.copyfile(tok_path, os.path.join(cfg.run_dir, "tokenizer.model.tmp"))
            os.replace(os.path.join(cfg.run_dir, "tokenizer.model.tmp"), os.path.join(cfg.run_dir, "tokenizer.model"))

    model = T.build_model(margs, cfg.seed)
    n_params, fpt = num_params(model), flops_per_token(model, cfg.data.seq_len)
    net = pipeline_module(model, pp) if pp > 1 else model
    groups = param_groups([net], cfg.train.weight_decay)
    t = cfg.train
    client_opt = None if "optimizer" in conf else torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    own_schedule = "scheduler" not in conf
    from deepspeed.utils import groups as ds_groups
    ds_groups.mpu = None  # a pipeline grid left by an earlier engine in this process must not leak into this one
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=client_opt, model_parameters=groups, config=conf)
    norm_box = [None]
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        from deepspeed.runtime.utils import clip_grad_norm_  # record the norm DeepSpeed computes when clipping

        def clip_and_record():
            norm_box[0] = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping() or 1e30, mpu=engine.mpu)
        engine.clip_fp32_gradients = clip_and_record
        if not engine.gradient_clipping():
            engine._config.gradient_clipping = 1e30  # never clips (coefficient 1): only measures
    log(f"model {cfg.model.preset}: {n_params:,} parameters | deepspeed {deepspeed.__version__} ZeRO-{conf['zero_optimization']['stage']}"
        f" pp{pp} x dp{dp} | global batch {t.global_batch_size} seq = {t.global_batch_size * cfg.data.seq_len} tokens,"
        f" micro {micro} per rank, {accum} accumulation steps | {device.type}/{info.backend}")

    root = os.path.join(cfg.run_dir, "checkpoints")
    step, samples, resumed = 0, 0, None
    if cfg.checkpoint.resume:
        step, samples, resumed = resume(engine, root, rank, log)
        if resumed:
            log(f"resumed from {resumed} (step {step}, {samples} samples consumed)")
    if resumed and step >= t.steps:  # rerunning a finished run changes nothing (idempotent)
        log(f"run already finished at step {step} (train.steps={t.steps}): {os.path.abspath(cfg.run_dir)}")
        return 0
    metrics = MetricsLogger(cfg.run_dir, rank, cfg.logging, to_dict(cfg), resume_step=step)
    step_metrics = StepMetrics(t.global_batch_size, cfg.data.seq_len, world, fpt, device)
    dp_rank = engine.grid.get_data_parallel_rank() if pp > 1 else rank
    dp_group = engine.grid.get_data_parallel_group() if pp > 1 else None
    G, bad = t.global_batch_size, 0
    evaluator = ParallelModel([engine], extras={"evaluate": _pipe_eval(engine)} if pp > 1 else {})
    t_last = time.perf_counter()
    while step < t.steps:
        lr = t.lr * lr_factor(step, t)
        if own_schedule:
            for g in engine.optimizer.param_groups:
                g["lr"] = lr
        else:
            lr = engine.get_lr()[0]
        batch = stream.batch(samples + dp_rank * local_bs, local_bs).to(device)
        norm_box[0] = None
        if pp > 1:
            micro_batches = iter([(batch[i * micro:(i + 1) * micro, :-1], batch[i * micro:(i + 1) * micro, 1:])
                                  for i in range(accum)])
            loss = engine.train_batch(data_iter=micro_batches).detach().float()
        else:
            total = torch.zeros((), device=device)
            for i in range(accum):
                mb = batch[i * micro:(i + 1) * micro]
                loss = T.loss_fn(engine(mb[:, :-1]), mb[:, 1:])
                engine.backward(loss)
                engine.step()
                total += loss.detach().float()
            loss = total / accum
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp_group)
        grad_norm = norm_box[0] if norm_box[0] is not None else engine.get_global_grad_norm()
        grad_norm = float(grad_norm.item() if torch.is_tensor(grad_norm) else (grad_norm if grad_norm is not None else math.nan))
        loss_val = loss.item()
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
        bad = 0 if finite else bad + 1
        if not finite:
            log(f"warning: step {step + 1}: non-finite loss/grad ({loss_val}); {bad} in a row")
        step, samples = step + 1, samples + G
        if bad >= t.max_bad_steps:
            raise T.TrainingError(f"{bad} consecutive steps with non-finite loss (train.max_bad_steps="
                                  f"{t.max_bad_steps}); lower train.lr or check the data")
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        if step % t.log_interval == 0 or step == t.steps:
            # skipped is False: DeepSpeed has already applied the step
            metrics.log(step_metrics.row(step, loss_val, lr, grad_norm, samples, dt, skipped=False))
        if evaluator and t.eval_interval and step % t.eval_interval == 0 and step < t.steps and valid:
            vl, _ = T.evaluate(evaluator, valid, micro, T.eval_batch_count(cfg, micro), device, contextlib.nullcontext)
            metrics.log({"step": step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50))})
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
            save(engine, root, step, {"step": step, "samples": samples}, cfg.checkpoint.keep, rank)
        t_last = time.perf_counter()
    if evaluator and valid:  # before the final save: once that checkpoint exists, metrics.jsonl is complete
        vl, n = T.evaluate(evaluator, valid, micro, T.eval_batch_count(cfg, micro), device, contextlib.nullcontext)
        metrics.log({"step": step, "val_loss": vl, "val_perplexity": math.exp(min(vl, 50)), "val_tokens": n})
    save(engine, root, step, {"step": step, "samples": samples}, cfg.checkpoint.keep, rank)
    metrics.close()
    if rank == 0:
        png = plot_run(cfg.run_dir) if cfg.logging.plot else None
        log(f"done: {step} steps (deepspeed); run dir {os.path.abspath(cfg.run_dir)}" + (f"; plot {png}" if png else ""))
    return 0


def _pipe_eval(engine):
    """Validation loss through PipelineEngine.eval_batch (full micro batches; the mean over equal-size micro
    batches is the token mean the native evaluate() reports)."""
    from llmforge.data import validation_batches

    def evaluate(valid, micro, max_batches, device, amp):
        batches = [b for b in validation_batches(valid, micro, max_batches) if len(b) == micro]
        if not batches:
            return float("nan"), 0
        it = iter([(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches])
        loss = engine.eval_batch(it, num_micro_batches=len(batches))
        return float(loss.float().item()), sum(b[:, 1:].numel() for b in batches)
    return evaluate


def main(argv: list[str] | None = None) -> int:
    """``python -m llmforge.engines.deepspeed CONFIG [k=v ...]``: llmforge.train with engine=deepspeed, accepting
    the ``--local_rank=N`` argument the deepspeed launcher adds (its value is also in LOCAL_RANK)."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    return T.main(argv[:1] + ["engine=deepspeed"] + argv[1:])


if __name__ == "__main__":
    sys.exit(main())
