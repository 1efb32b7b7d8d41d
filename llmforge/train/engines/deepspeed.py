"""``engine: deepspeed`` — the same model, data stream, metrics rows and run dir as the native loop, trained by
``deepspeed.initialize`` with a config generated from ours and the raw ``deepspeed:`` dict merged on top.

Generated: ZeRO stage (``parallel.zero_stage``), train_batch_size / micro batch / accumulation (``train.*``,
derived as in the native loop), gradient_clipping, bf16 when the train dtype resolves to bf16, and a client
torch AdamW with our decay/no-decay groups whose LR follows our schedule (set every step, so it is exact after a
resume). CPU offload (``deepspeed.zero_optimization.offload_optimizer.device=cpu``) switches to DeepSpeed's own
optimizer (DeepSpeedCPUAdam) with the same hyper-parameters. Raw ``deepspeed.optimizer`` / ``deepspeed.scheduler``
sections are refused before start, naming the ``train.*`` keys that set the same thing (our schedule and param
groups would silently override them). ``parallel.pp > 1`` trains through DeepSpeed's PipelineModule
(embedding | blocks | norm+head, ZeRO 0/1 only, as DeepSpeed requires).

Non-finite steps: the innermost optimizer step is skipped when this step's global gradient norm (as DeepSpeed
computed it) is not finite, in every ZeRO stage and under PP, and the Trainer counts it against
``train.max_bad_steps`` exactly as the native engine's skipped steps.

Checkpoints (engines/deepspeed_ckpt.py): ``run_dir/checkpoints/step_N`` written by ``save_checkpoint`` into a
hidden folder, vouched for by a COMPLETE marker (each file's size and content hash, hashed by the rank that wrote
it) and renamed into place; auto-resume loads the newest tag that verifies (model, optimizer, step, samples
consumed), skipping a damaged one with a warning naming the file; every file is unpickled weights-only
(checkpoint/deepspeed_weights.py), a crafted one is refused in one line before anything loads.
``llmforge.eval``/``generate``/``export_hf`` verify the same way and consolidate with DeepSpeed's own
``zero_to_fp32`` utilities (llmforge.inference.run_loading). Launch: ``deepspeed --num_gpus N --module
llmforge.train CONFIG engine=deepspeed`` (the launcher's ``--local_rank=N`` is accepted), torchrun or srun.

The loop is llmforge.train.trainer.Trainer, shared with the native engine. Every config key either has its effect here
or is refused before start: see ``KEY_POLICY`` (a test walks every key of the config dataclasses against it).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.distributed as dist

from llmforge.core.config import ConfigError
from llmforge.core.distributed import resolve_dtype
from llmforge.core.loss import loss_fn
from llmforge.core.optim import param_groups
from llmforge.train.run_plan import batch_plan

from .base import Engine, TrainState
from .deepspeed_pipe import pipe_eval, pipeline_module
from .deepspeed_policy import PREFIX, check_raw
from .deepspeed_ckpt import resume, save
from llmforge.common.atomic import write_json

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


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


def pipeline_micro(cfg, pp: int, dp: int) -> int | None:
    """The micro batch DeepSpeed's pipeline runs when parallel.pp_microbatches is set (it runs
    gradient_accumulation_steps micro batches per step): the per-rank batch / pp_microbatches; else None."""
    n_mb = cfg.parallel.pp_microbatches
    if pp == 1 or not n_mb:
        return None
    local = cfg.train.global_batch_size // dp
    if local % n_mb or (cfg.train.micro_batch_size and cfg.train.micro_batch_size * n_mb != local):
        raise ConfigError(f"parallel.pp_microbatches={n_mb} does not split the per-rank batch {local} "
                          f"(train.micro_batch_size={cfg.train.micro_batch_size})")
    return local // n_mb


def ds_config(cfg, world: int, dtype: torch.dtype = torch.float32) -> dict:
    """DeepSpeed config generated from ours with ``cfg.deepspeed`` merged on top, validated."""
    raw = cfg.deepspeed or {}
    check_raw(raw)
    pp, dp = ds_dims(cfg, world)
    _, micro, accum = batch_plan(cfg, dp, pipeline_micro(cfg, pp, dp))
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


# ------------------------------------------------------------------------------------------ communication
def shm_buffer_path(rank: int) -> str:
    """The /dev/shm file of DeepSpeed's CPU shared-memory allreduce for ``rank`` (deepspeed csrc/cpu/comm/shm.cpp
    names it after the uid, MASTER_ADDR and MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def init_deepspeed_comm(info) -> None:
    """``deepspeed.init_distributed`` without DeepSpeed's CPU allreduce leaving its 66 MB /dev/shm buffer per rank
    behind (it never unlinks them): /dev/shm filled up run after run, and a later run on the same port mapped a dead
    run's buffer with stale flags. Each rank removes its own stale name before any rank maps, and its fresh one once
    every rank has mapped them all: the mappings stay valid, and even kill -9 leaves nothing."""
    import deepspeed
    cpu = torch.device(info.device).type == "cpu" and dist.is_initialized()
    if cpu:
        _unlink(shm_buffer_path(info.rank))
        dist.barrier()
    deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)
    if cpu:
        dist.barrier()
        _unlink(shm_buffer_path(info.rank))


# ------------------------------------------------------------------------------------------ the engine
def _innermost_optimizer(opt):
    """The torch optimizer that DeepSpeed's wrappers (ZeRO, BF16_Optimizer) finally call ``step`` on."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def check_config(cls, cfg) -> None:
        from .deepspeed_policy import check_config
        check_config(cfg)

    @staticmethod
    def resolve_layout(cfg, world: int, margs):
        pp, dp = ds_dims(cfg, world)
        if pp > 1 and margs.tie_embeddings:
            raise ConfigError("parallel.pp>1 needs untied embeddings (model.tie_embeddings=false)")
        return (pp, dp), dp, pipeline_micro(cfg, pp, dp)

    def __init__(self, cfg, plan, info):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed
        from deepspeed.utils import groups as ds_groups
        from llmforge.train.engines.native import build_model
        from llmforge.model.transformer import flops_per_token, num_params
        from llmforge.parallel.apply import apply_compile
        from llmforge.parallel.recompute import apply_recompute
        for k, v in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank)):
            os.environ.setdefault(k, str(v))  # DeepSpeed reads these (plain python / srun leave some unset)
        init_deepspeed_comm(info)
        self.cfg, self.plan, self.device, self.rank = cfg, plan, info.device, info.rank
        self.pp, self.dp = plan.layout
        self.conf = ds_config(cfg, info.world_size, resolve_dtype(cfg.train.dtype, info.device))
        model = build_model(plan.margs, cfg.seed)
        if cfg.train.init_from_hf:
            from llmforge.hf import load_hf_into
            load_hf_into(model, cfg.train.init_from_hf)
        self.n_params, self.flops_per_token = num_params(model), flops_per_token(model, cfg.data.seq_len)
        self.n_active = self.n_params  # MoE is refused under DeepSpeed (check_config)
        apply_recompute(model, cfg.recompute, cfg.recompute_every)
        if cfg.parallel.compile:
            apply_compile(model)
        net = pipeline_module(model, self.pp) if self.pp > 1 else model
        groups = param_groups([net], cfg.train.weight_decay)
        t = cfg.train
        client = None if "optimizer" in self.conf else torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2),
                                                                          eps=t.eps)
        ds_groups.mpu = None  # a pipeline grid left by an earlier engine in this process must not leak into this one
        self.engine, _, _, _ = deepspeed.initialize(model=net, optimizer=client, model_parameters=groups,
                                                    config=self.conf)
        self._install_step_gate()
        self._install_norm_probe()
        self.dp_rank = self.engine.grid.get_data_parallel_rank() if self.pp > 1 else info.rank
        self.dp_group = self.engine.grid.get_data_parallel_group() if self.pp > 1 else None
        self.root = os.path.join(cfg.run_dir, "checkpoints")
        self.version = deepspeed.__version__

    def _install_step_gate(self) -> None:
        """Make the innermost optimizer step skippable, and skip it when this step's gradient norm is not finite.
        Every ZeRO stage, wrapper and the PipelineEngine end in this one call, after DeepSpeed computed the global
        norm, so skipping it leaves weights and Adam state untouched. DeepSpeed alone would step on an infinite
        norm (ZeRO-0, bf16 ZeRO-1/2: it clips with it) or skip silently (fp32 ZeRO-1/2, ZeRO-3): ``_stepped``
        says whether the update ran, and optim_step reports that to the Trainer's non-finite policy."""
        inner = _innermost_optimizer(self.engine.optimizer)
        original, self._skip, self._stepped = inner.step, False, False

        def step(*args, **kwargs):
            if self._skip or not self._norm_finite(inner):
                return None
            self._stepped = True
            return original(*args, **kwargs)
        inner.step = step

    def _norm_finite(self, inner) -> bool:
        """Whether this step's global gradient norm is finite: the ZeRO / bf16 wrapper's ``_global_grad_norm``, set
        before it calls the inner step (reduced over the data-parallel ranks and the pipeline stages, so every rank
        decides alike without a collective here), or the ZeRO-0 fp32 probe's (_install_norm_probe)."""
        wrapper = self.engine.optimizer
        norm = getattr(wrapper, "_global_grad_norm", None) if wrapper is not inner else self._norm_box[0]
        if norm is None:  # no norm computed: judge the gradients the inner step would apply
            return all(bool(torch.isfinite(p.grad).all()) for g in inner.param_groups for p in g["params"]
                       if p.grad is not None)
        return math.isfinite(float(norm))

    def _install_norm_probe(self) -> None:
        self._norm_box = [None]
        engine = self.engine
        if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            from deepspeed.runtime.utils import clip_grad_norm_  # record the norm DeepSpeed computes when clipping

            def clip_and_record():
                self._norm_box[0] = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping() or 1e30,
                                                    mpu=engine.mpu)
            engine.clip_fp32_gradients = clip_and_record
            if not engine.gradient_clipping():
                engine._config.gradient_clipping = 1e30  # never clips (coefficient 1): only measures

    def describe(self) -> str:
        p = self.plan
        return (f"deepspeed {self.version} ZeRO-{self.conf['zero_optimization']['stage']} pp{self.pp} x dp{self.dp} | "
                f"micro {p.micro} per rank, {p.accum} accumulation steps")

    def write_run_files(self, run_dir: str) -> None:
        write_json(os.path.join(run_dir, "deepspeed_config.json"), self.conf, sort_keys=False)

    def set_lr(self, lr: float) -> float:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Non-PP: every micro batch's backward and all but the last ``engine.step()`` (DeepSpeed steps the
        optimizer only at the accumulation boundary, which ``optim_step`` reaches). PP: ``train_batch`` runs the
        whole step, so the gate skips on a non-finite gradient norm itself."""
        micro, accum, self._norm_box[0], self._stepped = self.plan.micro, self.plan.accum, None, False
        mbs = [batch[i * micro:(i + 1) * micro] for i in range(accum)]
        if self.pp > 1:
            loss = self.engine.train_batch(data_iter=iter([(mb[:, :-1], mb[:, 1:]) for mb in mbs]))
            return loss.detach().float()
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(mbs):
            loss = loss_fn(self.engine(mb[:, :-1]), mb[:, 1:])
            self.engine.backward(loss)
            if i < accum - 1:
                self.engine.step()
            total += loss.detach().float()
        loss = total / accum
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=self.dp_group)
        return loss

    def clip_grad_norm(self, max_norm: float) -> None:
        return None  # DeepSpeed clips inside engine.step() (gradient_clipping = train.grad_clip)

    def optim_step(self, apply: bool) -> bool:
        """Applied only when the gate let the inner step run (a non-finite norm vetoes it) on every rank."""
        if self.pp == 1:  # under PP train_batch has already stepped, or skipped (see _install_step_gate)
            self._skip = not apply
            self.engine.step()
            self._skip = False
        stepped = torch.tensor(int(self._stepped), device=self.device)
        dist.all_reduce(stepped, op=dist.ReduceOp.MIN)  # one verdict for the policy, even if ranks ever differed
        return apply and bool(stepped.item())

    def grad_norm(self) -> float:
        norm = self._norm_box[0] if self._norm_box[0] is not None else self.engine.get_global_grad_norm()
        return float(norm.item() if torch.is_tensor(norm) else (norm if norm is not None else math.nan))

    def evaluate(self, valid, max_batches: int) -> tuple[float, int]:
        from llmforge.parallel import ParallelModel
        pm = ParallelModel([self.engine], eval_fn=pipe_eval(self.engine) if self.pp > 1 else None)
        return pm.evaluate(valid, self.plan.micro, max_batches, self.device, contextlib.nullcontext)

    def save(self, state: TrainState) -> None:
        save(self.engine, self.root, state.step, state.to_checkpoint(), self.cfg.checkpoint.keep, self.rank)

    def load_latest(self, log) -> TrainState | None:
        step, samples, path = resume(self.engine, self.root, self.rank, log)
        return None if path is None else TrainState(step, samples, path)
