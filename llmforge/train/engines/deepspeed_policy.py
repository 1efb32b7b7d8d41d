"""What ``engine: deepspeed`` does with every config key: honoured (and how) or refused before start.

``KEY_POLICY`` maps each key (or a ``section.*`` prefix whose keys are all handled by code both engines share) to
``("honoured", how)`` or ``("refused", when, why)``; ``check_config`` raises one ConfigError naming the first
refused key that is set, then :func:`check_raw` checks the raw ``deepspeed:`` dict (unknown keys; the
``optimizer`` / ``scheduler`` sections llmforge's own AdamW and schedule would override). Both run before any
collective. tests/engines/test_key_policy.py walks every key of the config dataclasses against KEY_POLICY.
"""
from __future__ import annotations

import difflib

from llmforge.core.config import ConfigError, RunConfig, describe
from llmforge.model.presets import PRESETS

SHARED = "the shared Trainer / run plan"
PREFIX = "deepspeed."

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
# Raw sections whose job llmforge does itself every step (set_lr, param_groups): DeepSpeed would build them and
# our values would override theirs, so giving them is refused, naming the keys that do take effect.
REPLACED = {
    "optimizer": "the optimizer is AdamW over llmforge's decay/no-decay groups; set train.lr, train.weight_decay, "
                 "train.beta1, train.beta2, train.eps (CPU offload: deepspeed.zero_optimization.offload_optimizer."
                 "device=cpu)",
    "scheduler": "the learning rate follows llmforge's schedule, set every step; set train.lr, train.schedule, "
                 "train.warmup_steps, train.min_lr_ratio, train.decay_fraction",
}

KEY_POLICY: dict[str, tuple] = {
    # sections read only by code both engines share (model build, data stream, metrics, process group)
    "model.*": ("honoured", "the same Transformer is built from the preset and overrides"),
    "data.*": ("honoured", "the same deterministic sample stream (run_plan / llmforge.data.megatron)"),
    "data.document_mask": ("refused", lambda c: c.data.document_mask,
                           "document masking is native-only for now (the DeepSpeed engine's blocks take no "
                           "positions); set data.document_mask=false or use engine=native"),
    "sft.pack": ("refused", lambda c: c.sft.pack, "SFT packing is native-only (the DeepSpeed engine's blocks take "
                 "no positions, and SFT data needs engine=native); set sft.pack=false or use engine=native"),
    "parallel.cp": ("refused", lambda c: c.parallel.cp > 1, "context parallelism is native-only for now; "
                    "use engine=native"),
    "parallel.cp_comm": ("honoured", "only read with parallel.cp>1, which is refused"),
    "logging.*": ("honoured", SHARED), "dist.*": ("honoured", "llmforge.core.distributed + deepspeed.init_distributed"),
    "run_dir": ("honoured", SHARED), "seed": ("honoured", "same initial weights and data order as native"),
    "engine": ("honoured", "selects this engine"),
    "recompute": ("honoured", "the same apply_recompute (torch checkpoint_wrapper) on the blocks"),
    "recompute_every": ("honoured", "the same apply_recompute"),
    "train.steps": ("honoured", SHARED), "train.global_batch_size": ("honoured", "train_batch_size"),
    "train.micro_batch_size": ("honoured", "train_micro_batch_size_per_gpu"),
    "train.grad_accum_steps": ("honoured", "gradient_accumulation_steps"),
    **{f"train.{k}": ("honoured", "our schedule sets the optimizer's lr every step") for k in
       ("lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction")},
    **{f"train.{k}": ("honoured", "client AdamW (or DeepSpeed's own optimizer) hyper-parameters") for k in
       ("weight_decay", "beta1", "beta2", "eps")},
    "train.fused_optimizer": ("honoured", "the client AdamW's fused flag (the step itself is DeepSpeed's)"),
    "train.grad_clip": ("honoured", "gradient_clipping"), "train.dtype": ("honoured", "bf16.enabled"),
    "train.log_interval": ("honoured", SHARED), "train.eval_interval": ("honoured", SHARED),
    "train.eval_batches": ("honoured", "the same validation windows"),
    "train.max_bad_steps": ("honoured", "the Trainer's non-finite policy; the innermost optimizer step is skipped "
                            "when the loss or DeepSpeed's global gradient norm is not finite"),
    "train.init_from_hf": ("honoured", "weights imported before deepspeed.initialize"),
    "train.allow_tokenizer_change": ("honoured", "the run plan's init_from_hf tokenizer check, shared with native"),
    "parallel.dp_replicate": ("refused", lambda c: c.parallel.dp_replicate > 1 and c.parallel.dp_shard > 1,
                              "HSDP (dp_replicate>1 with dp_shard>1) has no DeepSpeed equivalent: ZeRO shards over "
                              "every data-parallel rank; set parallel.dp_replicate=1 or use engine=native"),
    "parallel.dp_shard": ("honoured", "ZeRO partitions over the data-parallel ranks"),
    "model.moe.num_experts": ("refused", lambda c: bool(c.model.moe.num_experts or
                                                        getattr(PRESETS.get(c.model.preset), "moe", None)
                                                        and PRESETS[c.model.preset].moe.num_experts),
                              "mixture-of-experts models are not wired to DeepSpeed-MoE; use engine=native "
                              "(expert parallelism: parallel.ep)"),
    "parallel.ep": ("refused", lambda c: c.parallel.ep > 1, "expert parallelism is native only; use engine=native"),
    "parallel.tp": ("refused", lambda c: c.parallel.tp > 1,
                    "the deepspeed engine has no tensor parallelism for this model; use engine=native"),
    "parallel.pp": ("honoured", "PipelineModule (ZeRO 0/1)"),
    "parallel.zero_stage": ("honoured", "zero_optimization.stage"),
    "parallel.pp_schedule": ("refused", lambda c: c.parallel.pp > 1 and c.parallel.pp_schedule.lower() != "1f1b",
                             "DeepSpeed's PipelineEngine runs its own 1F1B schedule only; set parallel.pp_schedule=1F1B "
                             "or use engine=native"),
    "parallel.pp_microbatches": ("honoured", "gradient_accumulation_steps of the PipelineEngine"),
    "parallel.sequence_parallel": ("honoured", "only meaningful with parallel.tp>1, which is refused"),
    "parallel.loss_parallel": ("honoured", "only meaningful with parallel.tp>1, which is refused"),
    "train.init_from": ("refused", lambda c: bool(c.train.init_from),
                        "fine-tuning from a run dir is native-only for now; use engine=native (a DeepSpeed run's "
                        "weights load there through train.init_from=RUN_DIR)"),
    "train.freeze": ("refused", lambda c: bool(c.train.freeze), "freezing parameter groups is native-only for now; "
                     "use engine=native"),
    "train.lora.rank": ("refused", lambda c: c.train.lora.rank > 0, "LoRA adapters are native-only for now; use "
                        "engine=native"),
    "train.lora.alpha": ("honoured", "only read with train.lora.rank>0, which is refused"),
    "train.optimizer": ("refused", lambda c: c.train.optimizer != "adamw", "Muon is native-only for now (the "
                        "DeepSpeed engine steps AdamW); set train.optimizer=adamw or use engine=native"),
    "train.float8": ("refused", lambda c: c.train.float8, "float8 training is native-only for now; use "
                     "engine=native"),
    "train.float8_recipe": ("honoured", "only read with train.float8, which is refused"),
    "train.float8_emulate": ("honoured", "only read with train.float8, which is refused"),
    **{f"train.muon.{k}": ("honoured", "only read with train.optimizer=muon, which is refused") for k in
       ("momentum", "nesterov", "ns_steps", "ns_coefficients", "update_scale", "rms_scale", "lr", "weight_decay")},
    "train.lora.targets": ("honoured", "only read with train.lora.rank>0, which is refused"),
    "parallel.compile": ("honoured", "torch.compile of each block before deepspeed.initialize"),
    "checkpoint.interval": ("honoured", SHARED), "checkpoint.keep": ("honoured", "old step_N tags removed"),
    "checkpoint.resume": ("honoured", "load_checkpoint of the `latest` tag"),
    "checkpoint.async_save": ("refused", lambda c: c.checkpoint.async_save,
                              "DeepSpeed's save_checkpoint is synchronous here; set checkpoint.async_save=false"),
    "deepspeed": ("honoured", "merged over the generated DeepSpeed config (validated; raw optimizer/scheduler "
                  "sections refused for the train.* keys that set them)"),
    "eval.*": ("honoured", "read only with eval.tasks, which is refused"),
    "eval.tasks": ("refused", lambda c: bool(c.eval.tasks), "in-training benchmarks gather the native engine's "
                   "shards; score the checkpoints with python -m llmforge.eval RUN --tasks ..., or use engine=native"),
}


def policy_for(key: str) -> tuple | None:
    if key in KEY_POLICY:
        return KEY_POLICY[key]
    return KEY_POLICY.get(key.split(".")[0] + ".*")


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_config(cfg) -> None:
    """One ConfigError naming the first key this engine cannot honour with its current value. A key with no rule
    (added without a DeepSpeed mapping) is refused whenever it differs from its default."""
    for key, _, default, _ in describe(RunConfig):
        rule = policy_for(key)
        if rule is None:
            if _value(cfg, key) != default:
                raise ConfigError(f"{key}: not supported by engine=deepspeed (no DeepSpeed mapping); use engine=native")
            continue
        if rule[0] == "refused" and rule[1](cfg):
            raise ConfigError(f"{key}: not supported by engine=deepspeed: {rule[2]}")
    raw = cfg.deepspeed or {}
    if "gradient_clipping" in raw and raw["gradient_clipping"] != cfg.train.grad_clip:
        # one setting under two names: say which to use instead of letting the raw value win silently
        raise ConfigError(f"{PREFIX}gradient_clipping={raw['gradient_clipping']} conflicts with train.grad_clip="
                          f"{cfg.train.grad_clip} (the same setting): set train.grad_clip only")
    check_raw(raw)


def check_raw(raw: dict) -> None:
    """The raw ``deepspeed:`` dict's keys, checked without any collective: one ConfigError naming the key."""
    unknown = [k for k in raw if k not in KNOWN_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KNOWN_KEYS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown DeepSpeed config key '{PREFIX}{unknown[0]}'{hint}")
    for key, why in REPLACED.items():
        if key in raw:
            raise ConfigError(f"{PREFIX}{key}: not supported by engine=deepspeed: {why}")
    zero = raw.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        raise ConfigError(f"{PREFIX}zero_optimization.compute_grad_norm=false: the non-finite step policy "
                          "(train.max_bad_steps) needs the gradient norm; remove the key")
