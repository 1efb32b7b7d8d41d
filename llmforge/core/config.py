"""The trainer's typed configuration: the ``RunConfig`` schema (model, data, train, sft, parallel, checkpoint,
eval, logging, dist sections) and its cross-key checks. The machinery that loads any schema from YAML and dotted
overrides (``load_config``, ``ConfigError``, ``opt``, ``dump_config``, ...) lives in llmforge/common/typed_config.py
and is re-exported here, so ``from llmforge.core.config import load_config, ConfigError`` keeps working.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from llmforge.common.typed_config import (  # noqa: F401  (re-exported)
    ConfigError, _build, _set_dotted, check_ranges, describe, dump_config, key_ranges, load_config, markdown_keys,
    opt, parse_overrides, to_dict)


# --------------------------------------------------------------------------------------------- trainer schema
@dataclasses.dataclass
class MoEConfig:
    """Mixture of experts (llmforge/model/moe.py). Unset values (0, "", null, -1) keep the preset's."""
    num_experts: int = opt(0, "routed experts per MoE block (0: from the preset; a dense preset stays dense)", ge=0)
    top_k: int = opt(0, "experts each token is routed to (0: from the preset, else 2)", ge=0)
    ffn_dim: int = opt(0, "hidden size of each expert (0: from the preset, else model.ffn_dim)", ge=0)
    shared_experts: int = opt(-1, "always-on shared experts of ffn_dim each, DeepSeek style (-1: from the preset, "
                                  "else 0)", ge=0, also=(-1,))
    score: str = opt("", "router scores: softmax | sigmoid (empty: from the preset, else softmax)")
    balance: str = opt("", "load balancing: aux_loss (per-sequence Switch loss) | bias (DeepSeek-V3 "
                           "auxiliary-loss-free expert bias) | none (empty: from the preset, else aux_loss)")
    aux_loss_coef: float = opt(-1.0, "weight of the auxiliary balance loss (-1: from the preset, else 0.01)",
                               ge=0, also=(-1.0,))
    norm_topk: Optional[bool] = opt(None, "renormalise the top-k weights to sum 1, as Qwen3-MoE (null: preset, "
                                          "else true)")
    route_scale: float = opt(0.0, "factor on the routing weights (0: from the preset, else 1)", ge=0)
    dense_layers: int = opt(-1, "leading blocks that stay dense (-1: from the preset, else 0)", ge=0, also=(-1,))
    interval: int = opt(0, "after the dense ones, every interval-th block is MoE (0: from the preset, else 1)",
                        ge=0)
    bias_update_rate: float = opt(0.0, "balance=bias: step of each expert bias per optimizer step, towards the "
                                       "mean load (0: from the preset, else 1e-3)", ge=0)


@dataclasses.dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension (llmforge/model/blocks.py rope_tables), as transformers' rope_type
    "llama3" and "yarn". Unset numbers are 0."""
    type: str = opt("none", "none | llama3 (Llama 3.1: factor 8, low_freq_factor 1, high_freq_factor 4, "
                            "original_max_seq_len 8192) | yarn (factor, original_max_seq_len, beta_fast, beta_slow; "
                            "cos/sin scaled by 0.1 ln(factor) + 1). none: plain RoPE, or a start folder's scaling")
    factor: float = opt(0.0, "llama3 / yarn: how many times the original context the positions stretch to "
                             "(required)", ge=0)
    low_freq_factor: float = opt(0.0, "llama3: wavelengths above original_max_seq_len / low_freq_factor are "
                                      "divided by factor (required; Llama 3.1: 1)", ge=0)
    high_freq_factor: float = opt(0.0, "llama3: wavelengths below original_max_seq_len / high_freq_factor are kept "
                                       "(required; Llama 3.1: 4)", ge=0)
    original_max_seq_len: int = opt(0, "llama3 / yarn: the context length the model was pretrained at (required; "
                                       "transformers' original_max_position_embeddings)", ge=0)
    beta_fast: float = opt(0.0, "yarn: rotations bounding the kept (extrapolated) dimensions (0: 32)", ge=0)
    beta_slow: float = opt(0.0, "yarn: rotations bounding the interpolated dimensions (0: 1)", ge=0)


@dataclasses.dataclass
class ModelConfig:
    preset: str = opt("tiny", "model preset from llmforge.model.presets (tiny, gpt2-124m, llama-1b, llama-8b, llama-70b); "
                              "fields set below override it")
    family: str = opt("", "llama | gpt2 (empty: from the preset)")
    dim: int = opt(0, "hidden size (0: from the preset)", ge=0)
    n_layers: int = opt(0, "number of transformer blocks (0: from the preset)", ge=0)
    n_heads: int = opt(0, "attention heads (0: from the preset)", ge=0)
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0: from the preset)", ge=0)
    ffn_dim: int = opt(0, "MLP hidden size (0: from the preset)", ge=0)
    vocab_size: int = opt(0, "vocabulary size (0: from the preset, or from the data's tokenizer if the preset says 0)",
                          ge=0)
    max_seq_len: int = opt(0, "longest sequence (positions) the model supports (0: from the preset)", ge=0)
    rope_theta: float = opt(0.0, "RoPE base (0: from the preset)", ge=0)
    norm_eps: float = opt(0.0, "RMSNorm/LayerNorm epsilon (0: from the preset)", ge=0)
    tie_embeddings: Optional[bool] = opt(None, "share input embedding and output projection (null: from the preset)")
    qk_norm: Optional[bool] = opt(None, "RMSNorm of each query and key head before RoPE, as Qwen3 (llama family; "
                                        "null: from the preset)")
    head_dim: int = opt(0, "width of each attention head (0: from the preset, or dim / n_heads)", ge=0)
    moe: MoEConfig = opt(MoEConfig(), "mixture of experts (model.moe.num_experts > 0)")
    rope_scaling: RopeScalingConfig = opt(RopeScalingConfig(), "RoPE scaling for context extension (llama family)")


@dataclasses.dataclass
class DataConfig:
    paths: list[str] = opt([], "pipeline output dirs (using their shards/train-* and shards/valid-*) or shard prefixes")
    weights: Optional[list[float]] = opt(None, "blend weights, one per path (null: proportional to tokens)", gt=0)
    seq_len: int = opt(256, "tokens per training sequence", ge=2)
    valid_fraction: float = opt(0.02, "fraction of windows held out for validation when a path has no valid shards",
                                ge=0, lt=1)
    backend: str = opt("native", "native | megatron (megatron-core BlendedMegatronDatasetBuilder)")
    document_mask: bool = opt(False, "packed sequences attend only within each document and RoPE positions restart "
                                     "at every document start (boundaries from the shards' .idx; "
                                     "llmforge/model/attention.py)")


@dataclasses.dataclass
class LoRAConfig:
    rank: int = opt(0, "LoRA adapters of this rank on the blocks' target linears; everything else is frozen "
                       "(0: off). Merged into the weights by eval, generate and export_hf (llmforge/model/lora.py)", ge=0)
    alpha: float = opt(16.0, "LoRA scale: the update is (alpha / rank) B A", gt=0)
    targets: list[str] = opt(["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                             "linear layers of each block that get adapters (attention wq wk wv wo, MLP w1 w2 w3)")


@dataclasses.dataclass
class MuonConfig:
    momentum: float = opt(0.95, "Muon: momentum of the matrices' updates", ge=0, lt=1)
    nesterov: bool = opt(True, "Muon: Nesterov momentum")
    ns_steps: int = opt(5, "Muon: Newton-Schulz iterations per update", ge=1)
    ns_coefficients: list[float] = opt([3.4445, -4.7750, 2.0315], "Muon: the quintic's (a, b, c)", ge=-10, le=10)
    update_scale: str = opt("rms", "rms (Moonlight: 0.2 sqrt(max(rows, cols)), AdamW's lr and weight decay carry "
                                   "over) | spectral (sqrt(max(1, rows / cols))) | none")
    rms_scale: float = opt(0.2, "Muon: the RMS the rms rule matches (Moonlight's 0.2)", gt=0)
    lr: float = opt(0.0, "Muon's peak learning rate for the matrices (0: train.lr); the schedule applies", ge=0)
    weight_decay: Optional[float] = opt(None, "Muon's decoupled weight decay (null: train.weight_decay)", ge=0)


@dataclasses.dataclass
class TrainConfig:
    steps: int = opt(100, "optimizer steps to run", ge=0)
    global_batch_size: int = opt(8, "sequences per optimizer step, summed over all data-parallel ranks", ge=1)
    micro_batch_size: int = opt(0, "sequences per rank per forward/backward (0: global / dp, no accumulation)", ge=0)
    grad_accum_steps: int = opt(0, "0: derived = global_batch_size / (micro_batch_size * dp); else must equal that",
                                ge=0)
    lr: float = opt(3e-4, "peak learning rate", gt=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr", ge=0, le=1)
    warmup_steps: int = opt(10, "linear warmup steps", ge=0)
    schedule: str = opt("cosine", "cosine | wsd | constant")
    decay_fraction: float = opt(0.2, "WSD: fraction of steps spent in the final decay", ge=0, le=1)
    optimizer: str = opt("adamw", "adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest: "
                                  "llmforge/core/muon.py)")
    muon: MuonConfig = opt(MuonConfig(), "Muon (train.optimizer=muon)")
    float8: bool = opt(False, "float8 matmuls in the blocks' linear layers (torchao; llmforge/parallel/float8.py): "
                              "needs a GPU with compute capability 8.9+")
    float8_recipe: str = opt("tensorwise", "float8 scaling: tensorwise | rowwise")
    float8_emulate: bool = opt(False, "with train.float8: torchao's emulation instead of float8 kernels (runs on CPU; "
                                      "for tests)")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    dtype: str = opt("auto", "fp32 | bf16 | auto (bf16 autocast on CUDA, fp32 on CPU); master weights stay fp32")
    log_interval: int = opt(1, "write a metrics.jsonl row every N steps", ge=1)
    eval_interval: int = opt(0, "validation loss every N steps (0: only at the end)", ge=0)
    eval_batches: int = opt(2, "validation size per evaluation, in global batches: eval_batches x global_batch_size "
                                  "windows, scored in micro batches (the same windows in any layout and engine)", ge=1)
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a NaN/inf loss (each is skipped)", ge=1)
    fused_optimizer: Optional[bool] = opt(None, "fused AdamW (null: on CUDA). Fused skips a non-finite step on the "
                                                "device, so steps that are not logged never wait for the host")
    init_from_hf: str = opt("", "start from a Hugging Face model folder (weights imported into our model)")
    init_from: str = opt("", "fine-tuning: start from an llmforge run dir (its newest complete checkpoint, any layout) "
                             "or a Hugging Face folder; the model shape comes from it (llmforge/train/init_from.py)")
    allow_tokenizer_change: bool = opt(False, "let train.init_from / init_from_hf start from a model whose tokenizer "
                                              "differs from the data's (ids then mean other text; a warning)")
    freeze: list[str] = opt([], "parameter groups kept fixed: embeddings | head (final norm + output) | blocks:K "
                                "(the first K blocks) | block:I")
    lora: LoRAConfig = opt(LoRAConfig(), "low-rank adapters (LoRA)")


@dataclasses.dataclass
class SFTTrainConfig:
    """Fine-tuning on SFT data (``data.paths`` written by configs/data/sft.yaml; llmforge/data/sft.py)."""
    pack: bool = opt(False, "pack whole conversations into each data.seq_len + 1 sample (greedily in stored order, "
                            "padding only at a pack's end; a longer one alone, cut): each attends only within itself "
                            "and its positions restart, the loss is unchanged (llmforge/data/sft.py). Needs SFT data")


@dataclasses.dataclass
class ParallelConfig:
    dp_replicate: int = opt(-1, "ranks holding full replicas (-1: whatever the world size leaves)", ge=1, also=(-1,))
    dp_shard: int = opt(1, "ranks sharding parameters with FSDP2 (zero_stage 2/3)", ge=1)
    tp: int = opt(1, "tensor-parallel degree (with sequence parallel)", ge=1)
    ep: int = opt(1, "expert-parallel degree: MoE experts sharded over this many of the dp_shard ranks "
                     "(divides dp_shard and model.moe.num_experts; llmforge/parallel/expert_parallel.py)", ge=1)
    pp: int = opt(1, "pipeline-parallel stages", ge=1)
    cp: int = opt(1, "context-parallel degree: each sequence split over this many ranks (head-tail chunks), K/V "
                     "all-gathered for attention; world = pp x dp_replicate x dp_shard x cp x tp "
                     "(llmforge/parallel/context_parallel.py)", ge=1)
    cp_comm: str = opt("allgather", "context-parallel attention: allgather (K/V all-gathered, Llama 3) | alltoall "
                                    "(q/k/v all-to-all from sequence to head shards, DeepSpeed-Ulysses; n_heads / tp "
                                    "divisible by cp)")
    zero_stage: int = opt(0, "0 DDP AllReduce | 1 +sharded optimizer | 2 FSDP2 keep params | 3 FSDP2 reshard",
                          ge=0, le=3)
    pp_schedule: str = opt("1F1B", "GPipe | 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble | ...")
    pp_microbatches: int = opt(0, "pipeline microbatches per step (0: local batch / micro_batch_size)", ge=0)
    sequence_parallel: bool = opt(True, "shard norms/dropout activations along the sequence under TP")
    loss_parallel: bool = opt(True, "under TP keep the logits sharded over the vocabulary; the loss runs on shards")
    compile: bool = opt(False, "torch.compile each transformer block")


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = opt(0, "save every N steps (0: only at the end)", ge=0)
    keep: int = opt(2, "keep the newest K complete checkpoints", ge=1)
    async_save: bool = opt(False, "save in a background thread: training waits only until the state is staged "
                                  "(the next optimizer step waits for the copy); the next save and the end wait for "
                                  "the write (llmforge/checkpoint/writer.py)")
    resume: bool = opt(True, "resume from the newest complete checkpoint in run_dir/checkpoints")


@dataclasses.dataclass
class EvalConfig:
    tasks: list[str] = opt([], "lm-eval benchmark tasks run during training (llmforge.inference.benchmarks), e.g. "
                               "[sample_valid_bpb, sample_next_line_mc]; logged as task/metric")
    include_paths: list[str] = opt([], "extra folders of lm-eval task YAML files (the shipped llmforge/inference/eval_tasks "
                                       "are always searched)")
    interval: int = opt(0, "run eval.tasks every N steps (0: every train.eval_interval steps) and at the end", ge=0)
    limit: int = opt(0, "examples per task (0: all)", ge=0)
    num_fewshot: int = opt(-1, "few-shot examples per prompt (-1: each task's own default)", ge=0, also=(-1,))
    batch_size: int = opt(16, "requests per forward pass of the lm-eval adapter", ge=1)


@dataclasses.dataclass
class LoggingConfig:
    wandb: str = opt("disabled", "disabled | offline | online (never online unless asked)")
    wandb_project: str = opt("llmforge", "wandb project name")
    plot: bool = opt(True, "write loss.png (loss and lr curves) at the end")


@dataclasses.dataclass
class DistConfig:
    device: str = opt("auto", "auto | cpu | cuda")
    backend: str = opt("auto", "auto | gloo | nccl")
    timeout_s: int = opt(600, "collective timeout; a stuck rank fails with an error instead of hanging", ge=1)


@dataclasses.dataclass
class RunConfig:
    run_dir: str = opt("runs/default", "where config.yaml, metrics.jsonl, checkpoints/ and plots go")
    seed: int = opt(1234, "seed for init, data order and sampling", ge=0, le=2**32 - 1)
    engine: str = opt("native", "native (PyTorch FSDP2/DTensor/pipelining) | deepspeed")
    recompute: str = opt("none", "activation recomputation: none | full | selective")
    recompute_every: int = opt(1, "recompute every k-th block (full mode)", ge=1)
    model: ModelConfig = opt(ModelConfig(), "model shape")
    data: DataConfig = opt(DataConfig(), "training data")
    train: TrainConfig = opt(TrainConfig(), "optimisation and loop")
    sft: SFTTrainConfig = opt(SFTTrainConfig(), "fine-tuning on SFT data")
    parallel: ParallelConfig = opt(ParallelConfig(), "parallel layout")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(), "metrics sinks")
    eval: EvalConfig = opt(EvalConfig(), "downstream benchmarks during training (lm-evaluation-harness)")
    dist: DistConfig = opt(DistConfig(), "device and process group")
    deepspeed: dict = opt({}, "raw DeepSpeed config merged over the generated one (engine: deepspeed)")

    def resolved_dict(self) -> dict:
        """What ``dump_config`` writes: relative ``data.paths`` made absolute (against the working directory of
        the command that wrote it), so the run's config.yaml works from any folder (eval, generate, resume)."""
        out = to_dict(self)
        out["data"]["paths"] = [os.path.abspath(os.path.expanduser(p)) for p in self.data.paths]
        return out

    def validate(self) -> None:
        """Checks that need no world size; layout checks against the world live in llmforge.parallel."""
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        check_ranges(self)  # every numeric key's declared range (opt(..., ge=...)): also for configs built in code
        need(self.engine in ("native", "deepspeed"), "engine", f"{self.engine!r} is not native or deepspeed")
        need(self.recompute in ("none", "full", "selective"), "recompute", f"{self.recompute!r} is not none/full/selective")
        t, p = self.train, self.parallel
        need(t.schedule in ("cosine", "wsd", "constant"), "train.schedule", f"{t.schedule!r} is not cosine/wsd/constant")
        need(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"{t.dtype!r} is not auto/fp32/bf16")
        need(t.optimizer in ("adamw", "muon"), "train.optimizer", f"{t.optimizer!r} is not adamw or muon")
        need(t.float8_recipe in ("tensorwise", "rowwise"), "train.float8_recipe",
             f"{t.float8_recipe!r} is not tensorwise or rowwise")
        # torchao's Float8Colwise/RowwiseParallel all-gather float8 tensors in backward, which gloo cannot
        # ("RuntimeError: Invalid scalar type"), so they cannot be checked on CPU; the plain styles on Float8Linear
        # run but track one process only to ~1e-4 in 6 steps (row-parallel partial sums, amplified by float8)
        need(not (t.float8 and p.tp > 1), "train.float8", "with parallel.tp>1 is not supported yet (float8 TP "
             "styles are not wired): use data parallel, FSDP or pipeline stages")
        for key in ("float8_emulate", "float8_recipe"):
            need(t.float8 or getattr(t, key) == getattr(TrainConfig(), key), f"train.{key}",
                 "set, but train.float8=false: add train.float8=true (or drop the key)")
        changed = [f"train.muon.{k}" for k, v in to_dict(t.muon).items() if v != to_dict(MuonConfig())[k]]
        need(t.optimizer == "muon" or not changed, changed[0] if changed else "train.muon",
             f"set, but train.optimizer={t.optimizer}: add train.optimizer=muon (or drop the train.muon keys)")
        need(t.muon.update_scale in ("rms", "spectral", "none"), "train.muon.update_scale",
             f"{t.muon.update_scale!r} is not rms, spectral or none")
        need(len(t.muon.ns_coefficients) == 3, "train.muon.ns_coefficients", "needs three numbers (a, b, c)")
        need(t.optimizer != "muon" or p.zero_stage != 1, "train.optimizer",
             "muon with parallel.zero_stage=1 (ZeroRedundancyOptimizer) is not supported: use zero_stage 0, 2 or 3")
        check_rope_scaling_config(self.model.rope_scaling)
        need(self.data.backend in ("native", "megatron"), "data.backend", "must be native or megatron")
        need(p.cp_comm in ("allgather", "alltoall"), "parallel.cp_comm", f"{p.cp_comm!r} is not allgather or alltoall")
        need(not (self.data.document_mask and self.data.backend == "megatron"), "data.document_mask",
             "needs data.backend=native (the megatron backend's samples carry no document starts)")
        if self.data.weights is not None:
            need(len(self.data.weights) == len(self.data.paths), "data.weights", "needs one weight per data.paths entry")
        # DeepSpeed's ZeRO stages all partition over every data-parallel rank: dp_shard is just their count there
        need(p.dp_shard == 1 or p.zero_stage in (2, 3) or self.engine == "deepspeed", "parallel.dp_shard",
             f"dp_shard={p.dp_shard} shards parameters: use parallel.zero_stage=2 or 3 (or dp_replicate for DDP)")
        need(self.logging.wandb in ("disabled", "offline", "online"), "logging.wandb", "must be disabled/offline/online")
        need(self.dist.device in ("auto", "cpu", "cuda"), "dist.device", "must be auto, cpu or cuda")
        need(self.dist.backend in ("auto", "gloo", "nccl"), "dist.backend", "must be auto, gloo or nccl")
        bad = sorted(set(t.lora.targets) - {"wq", "wk", "wv", "wo", "w1", "w2", "w3"})
        need(not bad and (t.lora.targets or not t.lora.rank), "train.lora.targets",
             f"{bad or 'empty'}: choose from wq, wk, wv, wo, w1, w2, w3")
        need(not t.lora.rank or p.tp == 1, "train.lora.rank", "LoRA adapters are not tensor-parallel: use "
             "parallel.tp=1 (data parallel, ZeRO and pipeline stages all work)")
        for name in t.freeze:
            need(re.fullmatch(r"embeddings|head|blocks:\d+|block:\d+", name) is not None, "train.freeze",
                 f"unknown group {name!r}; valid: embeddings, head, blocks:K (the first K), block:I")


ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
                     "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow")}
ROPE_SCALING_NEEDS = {"llama3": ROPE_SCALING_KEYS["llama3"], "yarn": ("factor", "original_max_seq_len")}


def check_rope_scaling_config(r: RopeScalingConfig) -> None:
    """One ConfigError line: an unknown type, a parameter the type needs left unset, or one it does not use."""
    if r.type not in ("none", "llama3", "yarn"):
        raise ConfigError(f"model.rope_scaling.type: {r.type!r} is not none, llama3 or yarn")
    for key in ROPE_SCALING_NEEDS.get(r.type, ()):
        if not getattr(r, key):
            raise ConfigError(f"model.rope_scaling.{key}: required by model.rope_scaling.type={r.type} (unset)")
    used = ROPE_SCALING_KEYS.get(r.type, ())
    for key, value in to_dict(r).items():
        if key != "type" and key not in used and value != getattr(RopeScalingConfig(), key):
            raise ConfigError(f"model.rope_scaling.{key}: set, but model.rope_scaling.type={r.type} does not use it")
    if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        raise ConfigError(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed low_freq_factor="
                          f"{r.low_freq_factor}")
