"""Which keys a query attends to, and the attention kernel that applies it. No parallel code in here.

A plain batch attends causally (SDPA ``is_causal``). A packed batch with document masking carries ``positions``
(batch, seq): each token's position inside its document, 0 at every document start. A token then sees only the
earlier tokens of its own document: with ``index`` the token's place in the packed sequence, two tokens share a
document exactly when ``index - position`` (the index of their document's first token) is equal, so positions
alone describe the mask and RoPE restarts at each document with the same tensor.

``TokenLayout`` holds that description for one forward pass; the mask it implies is built once per forward and
shared by every layer (``CoreAttention`` asks the layout for it):
- CPU (and short CUDA sequences): a boolean (batch, 1, q, k) mask for SDPA, exact;
- CUDA from ``FLEX_MIN_LEN`` tokens: a FlexAttention ``BlockMask`` (never a dense S x S tensor), with
  ``flex_attention`` compiled once. FlexAttention has no CPU backward, so CPU always takes the SDPA path.
Context parallelism (llmforge/parallel/context_parallel.py) replaces ``CoreAttention`` with a module that sees
the whole sequence's keys; it reuses ``build_mask`` with the global indices of its query and key chunks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FLEX_MIN_LEN = 4096  # CUDA: from this many query tokens the mask is a FlexAttention BlockMask


class TokenLayout:
    """Per forward pass: ``positions`` (batch, seq) of the local tokens and, once asked for, their masks
    (cached here so every layer, and recomputation in backward, reuses them)."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self.cache: dict = {}

    def doc_starts(self, index: torch.Tensor) -> torch.Tensor:
        """(batch, seq): the packed-sequence index of each token's document start, given the tokens' indices."""
        return index[None, :] - self.positions

    def local_mask(self, like: torch.Tensor):
        """The mask of this layout's own tokens against themselves (no context parallelism)."""
        if "local" not in self.cache:
            n = self.positions.shape[1]
            index = torch.arange(n, device=self.positions.device)
            starts = self.doc_starts(index)
            self.cache["local"] = build_mask(index, starts, index, starts, like)
        return self.cache["local"]


def build_mask(q_index, q_doc, kv_index, kv_doc, like: torch.Tensor, flex: bool | None = None):
    """Causal within the document: query i sees key j when index_j <= index_i and both have the same document
    start. ``q_index`` (q,), ``q_doc`` (batch, q), ``kv_index`` (k,), ``kv_doc`` (batch, k). Returns a boolean
    (batch, 1, q, k) tensor, or a FlexAttention BlockMask on CUDA for long sequences (``like``: a query tensor
    (batch, heads, q, head_dim) giving device and sizes; ``flex`` forces the choice, for tests)."""
    if flex is None:
        flex = like.device.type == "cuda" and q_index.numel() >= FLEX_MIN_LEN
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (kv_index[ki] <= q_index[qi]) & (kv_doc[b, ki] == q_doc[b, qi])
        # compiled on CUDA: the eager construction evaluates mask_mod on the dense q x k grid first
        return create_block_mask(mask_mod, q_doc.shape[0], None, q_index.numel(), kv_index.numel(),
                                 device=like.device, _compile=like.device.type == "cuda")
    causal = kv_index[None, :] <= q_index[:, None]
    return (causal[None] & (q_doc[:, :, None] == kv_doc[:, None, :]))[:, None]


_compiled_flex = None


def masked_attention(q, k, v, mask, gqa: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (batch, heads, seq, head_dim) tensors and a ``build_mask`` result."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    global _compiled_flex
    if _compiled_flex is None:  # compiled once: eager flex_attention materialises the scores
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)


class CoreAttention(nn.Module):
    """Scaled dot-product attention of (batch, heads, seq, head_dim) q/k/v: causal, or causal within documents
    when a ``TokenLayout`` is given. A module (no parameters) so that context parallelism can swap it."""

    def forward(self, q, k, v, layout: TokenLayout | None = None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if layout is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return masked_attention(q, k, v, layout.local_mask(q), gqa)
