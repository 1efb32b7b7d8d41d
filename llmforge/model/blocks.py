"""Transformer building blocks shared by the Llama and GPT-2 families. No parallelism in here.

Attention uses ``scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU). Projections keep
``wq/wk/wv/wo`` and ``w1/w2/w3`` names so tensor-parallel plans and checkpoint keys can address them, and
attention reshapes with ``-1`` heads so it works unchanged when TP leaves a rank with a slice of the heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CoreAttention, TokenLayout
from .moe import MoE, MoEArgs


ROPE_SCALING_TYPES = ("none", "llama3", "yarn")
ROPE_SCALING_NEEDS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
                      "yarn": ("factor", "original_max_seq_len")}


@dataclass
class RopeScaling:
    """RoPE scaling for context extension, as transformers' ``rope_type`` "llama3" (Llama 3.1) and "yarn". Unset
    numbers are 0; YaRN's beta_fast / beta_slow default to 32 / 1 and its attention factor is transformers'
    default, 0.1 ln(factor) + 1 (cos and sin are multiplied by it)."""
    type: str = "none"
    factor: float = 0.0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_seq_len: int = 0
    beta_fast: float = 0.0
    beta_slow: float = 0.0

    def missing(self) -> list[str]:
        """The parameters ``type`` needs that are unset (0)."""
        return [k for k in ROPE_SCALING_NEEDS.get(self.type, ()) if not getattr(self, k)]


@dataclass
class ModelArgs:
    family: str = "llama"          # llama: RoPE + RMSNorm + SwiGLU (+GQA); gpt2: learned positions + LayerNorm + GELU
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 256
    vocab_size: int = 0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False          # Qwen3: RMSNorm of each query and key head before RoPE (llama family)
    attn_head_dim: int = 0         # per-head width (0: dim // n_heads); Qwen3 uses 128 with 64 heads on 4096
    moe: MoEArgs = field(default_factory=MoEArgs)  # num_experts 0: every block dense
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # type none: plain RoPE

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:  # model.head_dim (0: dim // n_heads)
        self.attn_head_dim = value

    @property
    def bias(self) -> bool:
        return self.family == "gpt2"


def make_norm(args: ModelArgs) -> nn.Module:
    if args.family == "gpt2":
        return nn.LayerNorm(args.dim, eps=args.norm_eps)
    return nn.RMSNorm(args.dim, eps=args.norm_eps)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in the rotate-half layout that Hugging Face Llama uses; ``scaling``
    (type llama3 / yarn) changes the inverse frequencies and, for YaRN, scales cos and sin by the attention factor,
    as transformers' modeling_rope_utils does. Type none (or None) gives exactly the unscaled tables."""
    attention_factor = 1.0
    if scaling is None or scaling.type == "none":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    else:
        inv_freq, attention_factor = scaled_inv_freq(head_dim, theta, scaling, device)
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    if attention_factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def model_rope_tables(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables of a model shape (its head width, max_seq_len, theta and rope_scaling)."""
    return rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device, args.rope_scaling)


def scaled_inv_freq(dim: int, base: float, s: RopeScaling, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) of RoPE scaling ``s``: transformers' _compute_llama3_parameters and
    _compute_yarn_parameters (default attention factor, truncated correction range)."""
    missing = s.missing()
    if s.type not in ROPE_SCALING_NEEDS or missing:
        raise ValueError(f"model.rope_scaling: type {s.type!r} needs {', '.join(missing) or 'type llama3 or yarn'}")
    arange = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
    if s.type == "llama3":
        inv_freq = 1.0 / (base ** (arange / dim))
        factor, low, high, old_len = s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long waves: / factor
        smooth = (old_len / wavelen - low) / (high - low)  # between the two: interpolated
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, inv_freq_llama), 1.0
    factor = s.factor
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times into the original context
        return (dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (arange / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency (high frequencies), 0: interpolated by factor
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim), or (batch, seq, head_dim) when each token has
    its own position (packed documents, context-parallel chunks)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Per-layer key/value buffers for incremental decoding."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=args.bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=args.bias)
        if args.qk_norm:  # per head, weights shared by the heads (Qwen3)
            self.q_norm = nn.RMSNorm(hd, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.core = CoreAttention()  # no parameters; context parallelism swaps it (parallel/context_parallel.py)

    def forward(self, x, cos=None, sin=None, cache: KVCache | None = None, start_pos: int = 0,
                layout: TokenLayout | None = None):
        bsz, seqlen, _ = x.shape
        hd = self.args.head_dim
        q = self.wq(x).view(bsz, seqlen, -1, hd)
        k = self.wk(x).view(bsz, seqlen, -1, hd)
        v = self.wv(x).view(bsz, seqlen, -1, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        # grouped-query attention: each kv head serves n_heads / n_kv_heads query heads. SDPA's enable_gqa reads
        # the shared K/V in place (no repeat_interleave copies of K/V, which cost memory and bandwidth)
        gqa = q.shape[2] != k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is None or start_pos == 0:
            out = self.core(q, k, v, layout)  # causal, or causal within documents (model/attention.py)
        else:  # decoding with a cache: query i sits at position start_pos + i
            kv_len = k.shape[2]
            mask = torch.ones(seqlen, kv_len, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated = args.family != "gpt2"
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=args.bias)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=args.bias)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False) if self.gated else None

    def forward(self, x):
        if self.gated:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Attention and a feed-forward: dense (``feed_forward``) or mixture-of-experts (``moe``, by layer index)."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention_norm = make_norm(args)
        self.attention = Attention(args)
        self.ffn_norm = make_norm(args)
        sparse = args.moe.is_moe_layer(layer)
        self.feed_forward = None if sparse else FeedForward(args)
        self.moe = MoE(args.dim, args.ffn_dim, args.moe) if sparse else None

    def forward(self, x, cos=None, sin=None, cache=None, start_pos: int = 0, layout: TokenLayout | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, layout)
        return x + (self.moe or self.feed_forward)(self.ffn_norm(x))


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_block(block: TransformerBlock, n_layers: int) -> None:
    """GPT-2/Megatron scaled init: residual output projections get std 0.02 / sqrt(2 * n_layers)."""
    out_std = 0.02 / math.sqrt(2 * n_layers)
    for lin in (block.attention.wq, block.attention.wk, block.attention.wv):
        init_linear(lin, 0.02)
    init_linear(block.attention.wo, out_std)
    if block.feed_forward is not None:
        init_linear(block.feed_forward.w1, 0.02)
        if block.feed_forward.w3 is not None:
            init_linear(block.feed_forward.w3, 0.02)
        init_linear(block.feed_forward.w2, out_std)
    if block.moe is not None:
        moe = block.moe
        for w, std in ((moe.router.gate.weight, 0.02), (moe.experts.w1, 0.02), (moe.experts.w3, 0.02),
                       (moe.experts.w2, out_std)):
            nn.init.normal_(w, std=std)
        if moe.shared is not None:
            for lin, std in ((moe.shared.w1, 0.02), (moe.shared.w3, 0.02), (moe.shared.w2, out_std)):
                init_linear(lin, std)
        moe.reset_buffers()
    for norm in (block.attention_norm, block.ffn_norm):
        norm.reset_parameters()
    if block.attention.args.qk_norm:
        block.attention.q_norm.reset_parameters()
        block.attention.k_norm.reset_parameters()
