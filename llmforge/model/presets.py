"""Named model shapes. Published parameter counts are checked in tests (meta device, no memory)."""
from __future__ import annotations

import dataclasses

from .blocks import ModelArgs, RopeScaling
from .moe import MoEArgs

PRESETS: dict[str, ModelArgs] = {
    # Trains in seconds on a CPU; vocab comes from the tokenizer of the data.
    "tiny": ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=0,
                      max_seq_len=512),
    "tiny-gpt2": ModelArgs(family="gpt2", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, vocab_size=0,
                           max_seq_len=512, tie_embeddings=True),
    # GPT-2 small: 124,439,808 parameters.
    "gpt2-124m": ModelArgs(family="gpt2", dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072,
                           vocab_size=50257, max_seq_len=1024, tie_embeddings=True),
    # Llama 3.2 1B: 1,235,814,400 parameters.
    "llama-1b": ModelArgs(family="llama", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                          vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    # Llama 3.1 8B: 8,030,261,248 parameters.
    "llama-8b": ModelArgs(family="llama", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                          vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    # Llama 3.1 70B: 70,553,706,496 parameters.
    "llama-70b": ModelArgs(family="llama", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                           vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    # Trains on a CPU in seconds: 8 experts of width 64, top-2, in both blocks.
    "tiny-moe": ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=0,
                          max_seq_len=512, moe=MoEArgs(num_experts=8, top_k=2, ffn_dim=64, dense_layers=0)),
    # Qwen3-30B-A3B: 30,532,122,624 parameters, 3.35B active.
    "qwen3-30b-a3b": ModelArgs(family="llama", dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_dim=6144,
                               vocab_size=151936, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                               qk_norm=True, attn_head_dim=128,
                               moe=MoEArgs(num_experts=128, top_k=8, ffn_dim=768, aux_loss_coef=0.001)),
    # Qwen3-235B-A22B: 235,093,634,560 parameters, 22.19B active.
    "qwen3-235b-a22b": ModelArgs(family="llama", dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, ffn_dim=12288,
                                 vocab_size=151936, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                                 qk_norm=True, attn_head_dim=128,
                                 moe=MoEArgs(num_experts=128, top_k=8, ffn_dim=1536, aux_loss_coef=0.001)),
}

# Where the config (llmforge.core.config.ModelConfig) says 0/None, the preset's value is kept.
OVERRIDABLE = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
                "rope_theta", "norm_eps", "tie_embeddings", "qk_norm", "head_dim")


def model_args(model_cfg, vocab_size: int | None = None) -> ModelArgs:
    """Resolve ``model.preset`` + explicit fields (+ the data's vocab size when neither gives one)."""
    if model_cfg.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {model_cfg.preset!r}; choose one of {sorted(PRESETS)}")
    args = dataclasses.replace(PRESETS[model_cfg.preset])
    for key in OVERRIDABLE:
        value = getattr(model_cfg, key)
        unset = value is None if key in ("tie_embeddings", "qk_norm") else value in (0, 0.0, "")  # False: a choice
        if not unset:
            setattr(args, key, value)
    args.moe = moe_args(args.moe, model_cfg.moe)
    args.rope_scaling = rope_scaling_args(args.rope_scaling, model_cfg.rope_scaling)
    if args.vocab_size <= 0:
        if not vocab_size:
            raise ValueError("model.vocab_size: the preset has none and no tokenizer was found next to the data")
        args.vocab_size = vocab_size
    if args.family not in ("llama", "gpt2"):
        raise ValueError(f"model.family: {args.family!r} is not llama or gpt2")
    check_moe(args)
    check_rope_scaling(args)
    if args.family == "gpt2" and args.n_kv_heads != args.n_heads:
        args.n_kv_heads = args.n_heads  # GPT-2 has no grouped-query attention
    return args


MOE_UNSET = {"num_experts": 0, "top_k": 0, "ffn_dim": 0, "shared_experts": -1, "score": "", "balance": "",
             "aux_loss_coef": -1.0, "norm_topk": None, "route_scale": 0.0, "dense_layers": -1, "interval": 0,
             "bias_update_rate": 0.0}


def moe_args(preset: MoEArgs, moe_cfg) -> MoEArgs:
    """The preset's MoE shape with every set ``model.moe.*`` key applied."""
    changes = {k: getattr(moe_cfg, k) for k, unset in MOE_UNSET.items() if getattr(moe_cfg, k) != unset}
    return dataclasses.replace(preset, **changes)


def check_moe(args: ModelArgs) -> None:
    m = args.moe
    if not m.num_experts:
        return
    if args.family != "llama":
        raise ValueError("model.moe.num_experts > 0 needs model.family=llama (SwiGLU experts)")
    if not 1 <= m.top_k <= m.num_experts:
        raise ValueError(f"model.moe.top_k={m.top_k} must be between 1 and model.moe.num_experts={m.num_experts}")
    if m.score not in ("softmax", "sigmoid"):
        raise ValueError(f"model.moe.score: {m.score!r} is not softmax or sigmoid")
    if m.balance not in ("aux_loss", "bias", "none"):
        raise ValueError(f"model.moe.balance: {m.balance!r} is not aux_loss, bias or none")
    if m.dense_layers >= args.n_layers:
        raise ValueError(f"model.moe.dense_layers={m.dense_layers} leaves no MoE block of model.n_layers="
                         f"{args.n_layers}")


def rope_scaling_args(preset: RopeScaling, cfg) -> RopeScaling:
    """``model.rope_scaling`` when its type is set (not none), else the preset's (or a start folder's) scaling."""
    if cfg is None or cfg.type == "none":
        return preset
    return RopeScaling(**dataclasses.asdict(cfg))


def check_rope_scaling(args: ModelArgs) -> None:
    """One ValueError line: rope_scaling on gpt2 (learned positions), or a type missing a parameter it needs."""
    s = args.rope_scaling
    if s.type == "none":
        return
    if args.family != "llama":
        raise ValueError(f"model.rope_scaling.type={s.type} needs model.family=llama (RoPE); {args.family} has "
                         "learned positions")
    if s.type not in ("llama3", "yarn"):
        raise ValueError(f"model.rope_scaling.type: {s.type!r} is not none, llama3 or yarn")
    if s.missing():
        raise ValueError(f"model.rope_scaling.{s.missing()[0]}: required by model.rope_scaling.type={s.type} (unset)")
