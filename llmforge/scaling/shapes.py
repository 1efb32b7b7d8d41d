"""Round a parameter count to a Llama-shaped model (layers, dim, heads, kv heads, ffn multiple).

The family rules follow Llama 2/3: SwiGLU with ffn = multiple_of * ceil(1.3 * (8/3) dim / multiple_of), grouped-
query attention with (up to) 8 key/value heads, head_dim 128 for wide models, and a depth around dim/100-128
(Llama 3: 2048/16, 4096/32, 8192/80). The count is exact for llmforge's Llama (checked against the real module in
the tests), embeddings included and untied.
"""
from __future__ import annotations

import dataclasses
import math

FFN_MULTIPLIER = 1.3     # Llama 3 8B/70B (ffn_dim_multiplier)
TARGET_ASPECT = 100.0    # dim / n_layers the search prefers when several shapes hit the count equally well
MIN_DIM, MIN_LAYERS = 64, 2


@dataclasses.dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """One block: attention (wq, wk, wv, wo), SwiGLU MLP (w1, w2, w3) and two RMSNorms."""
        d = self.dim
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.ffn_dim + 2 * d

    def embedding_params(self) -> int:
        """Input embedding + untied output projection."""
        return 2 * self.vocab_size * self.dim

    def params(self) -> int:
        """Every parameter (the N of the scaling law): blocks, final norm, input and output embeddings."""
        return self.n_layers * self.layer_params() + self.dim + self.embedding_params()

    def non_embedding_params(self) -> int:
        return self.params() - self.vocab_size * self.dim * 2

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as llmforge.model.transformer.flops_per_token counts them (6 x matmul params +
        the attention term 12 L d s); the scaling law itself uses C = 6 N D."""
        return 6 * (self.params() - self.vocab_size * self.dim) + 12 * self.n_layers * self.dim * seq_len

    def model_overrides(self) -> dict:
        """The ``model.*`` config keys that build this shape with llmforge's Llama."""
        return {"family": "llama", "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "ffn_dim": self.ffn_dim, "vocab_size": self.vocab_size,
                "tie_embeddings": False}

    def describe(self) -> str:
        return (f"{self.n_layers} layers, dim {self.dim}, {self.n_heads} heads ({self.n_kv_heads} kv), "
                f"ffn {self.ffn_dim}, vocab {self.vocab_size}")


def _head_dim(dim: int) -> int:
    if dim >= 3072:
        return 128
    if dim >= 512:
        return 64
    return 32 if dim >= 256 else 16


def _ffn_dim(dim: int) -> int:
    multiple = 256 if dim >= 1024 else 32
    hidden = int(FFN_MULTIPLIER * int(8 * dim / 3))
    return multiple * math.ceil(hidden / multiple)


def shape_for(dim: int, n_layers: int, vocab_size: int) -> Shape:
    """The Llama-family shape with this width and depth."""
    n_heads = dim // _head_dim(dim)
    n_kv = 8 if n_heads >= 32 else max(1, n_heads // 4)  # the grid keeps n_heads a multiple of 4 (of 8 from 32)
    return Shape(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=_ffn_dim(dim),
                 vocab_size=vocab_size)


def _dims():
    """Widths whose head count is a multiple of 4 (of 8 from 32 heads on); depth gives the fine steps."""
    yield from range(MIN_DIM, 256, 64)        # head_dim 16
    yield from range(256, 512, 128)           # head_dim 32
    yield from range(512, 2048, 256)          # head_dim 64
    yield from range(2048, 3072, 512)
    yield from range(3072, 65536 + 1, 1024)   # head_dim 128


def smallest(vocab_size: int) -> Shape:
    return shape_for(MIN_DIM, MIN_LAYERS, vocab_size)


def round_to_shape(n_params: float, vocab_size: int) -> Shape:
    """The Llama shape whose parameter count is closest to ``n_params`` (log distance), preferring a depth near
    dim / 100 among near-ties (aspect ratios dim / n_layers from 8 to 256 are allowed) and, from 16 layers on,
    a multiple of 4 layers (so pipeline stages split evenly)."""
    best, best_score = None, math.inf
    for dim in _dims():
        probe = shape_for(dim, 1, vocab_size)
        fixed, per_layer = probe.params() - probe.layer_params(), probe.layer_params()
        if fixed > 2 * n_params and best is not None:
            break  # wider models only get bigger
        for n_layers in range(max(MIN_LAYERS, dim // 256), max(MIN_LAYERS, dim // 8) + 1):
            total = fixed + n_layers * per_layer
            score = abs(math.log(total / n_params)) + 0.05 * abs(math.log(dim / n_layers / TARGET_ASPECT))
            score += 0.02 * (n_layers >= 16 and n_layers % 4 != 0)  # deep models: depths that split into stages
            if score < best_score:
                best, best_score = (dim, n_layers), score
    return shape_for(best[0], best[1], vocab_size)
