"""The decoder: Llama-style or GPT-2-style by ``ModelArgs.family``. Readable top to bottom, no parallel code.

Layers live in a ``ModuleDict`` keyed "0".."L-1" so a pipeline stage can delete the layers it does not own
(and the embedding/norm/output it does not need, setting them to None) while every parameter keeps its
fully-qualified name: checkpoints then move freely between layouts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import TokenLayout
from .blocks import KVCache, ModelArgs, TransformerBlock, init_block, make_norm, model_rope_tables


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("model vocab_size must be > 0 (set model.vocab_size or train on tokenized data)")
        if (args.dim % args.n_heads and not args.attn_head_dim) or args.n_heads % args.n_kv_heads:
            raise ValueError(f"dim {args.dim} / n_heads {args.n_heads} / n_kv_heads {args.n_kv_heads} do not divide")
        if args.moe.num_experts and args.family == "gpt2":
            raise ValueError("model.moe is a Llama-family option (SwiGLU experts); gpt2 blocks stay dense")
        if args.qk_norm and args.family == "gpt2":
            raise ValueError("model.qk_norm is a Llama-family option (Qwen3); gpt2 has no per-head norms")
        if args.rope_scaling.type != "none" and args.family == "gpt2":
            raise ValueError("model.rope_scaling is a Llama-family option (RoPE); gpt2 has learned positions")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim) if args.family == "gpt2" else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm = make_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_device = None
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, buffer_device=None) -> None:
        """(Re)initialise parameters and RoPE tables on a whole, unsharded model (construction, inference loading).
        Training builds on the meta device and initialises each rank's shards with llmforge.model.init instead,
        a function of (seed, parameter name, position), so that every layout starts from the same weights."""
        if self.args.family != "gpt2":
            cos, sin = model_rope_tables(self.args, buffer_device)
            self.rope_cos, self.rope_sin = cos, sin
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        if self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, std=0.01)
        for block in self.layers.values():
            init_block(block, self.args.n_layers)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=self.args.dim ** -0.5)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None, start_pos: int = 0,
                positions: torch.Tensor | None = None):
        """tokens: (batch, seq) ids on the first stage, hidden states (batch, seq, dim) on later pipeline stages.
        ``positions`` (batch, seq): each token's position in its document (packed documents, document masking;
        llmforge/model/attention.py), None for one causal sequence from ``start_pos``.
        Returns logits (batch, seq, vocab) on the last stage, hidden states elsewhere."""
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        layout = TokenLayout(positions) if positions is not None else None
        if self.pos_embeddings is not None:
            pos = positions if positions is not None else torch.arange(start_pos, start_pos + seqlen, device=h.device)
            h = h + self.pos_embeddings(pos)
        cos = sin = None
        if self.args.family != "gpt2":
            if positions is not None:
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            else:
                cos = self.rope_cos[start_pos:start_pos + seqlen]
                sin = self.rope_sin[start_pos:start_pos + seqlen]
        for i, block in enumerate(self.layers.values()):
            h = block(h, cos, sin, caches[i] if caches is not None else None, start_pos, layout)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        p = next(self.parameters())
        return [KVCache(batch, max_len, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device)
                for _ in self.layers]


def num_params(model: nn.Module, exclude_embeddings: bool = False, active: bool = False) -> int:
    """Exact count of unique parameters (tied weights counted once). ``active``: a routed expert's weights count
    top_k / num_experts of their size (what one token uses), as published "active parameters" do."""
    seen, total = set(), 0
    moe = getattr(model, "args", None) and model.args.moe
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and ("tok_embeddings" in name or "pos_embeddings" in name):
            continue
        n = p.numel()
        if active and moe and ".moe.experts." in name:
            n = n * moe.top_k // moe.num_experts
        total += n
    return total


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding *active* params (a token passes k of the routed experts) plus the attention score/value term
    12 * layers * n_heads * head_dim * seq_len (PaLM appendix B, where n_heads * head_dim is usually dim; what
    torchtitan uses). The output projection is a matmul and always counts, also when it shares its weight with
    the (counted-once) input embedding."""
    args = model.args
    n_embed = num_params(model) - num_params(model, exclude_embeddings=True)
    matmul_params = num_params(model, active=True) - n_embed + (args.vocab_size * args.dim if args.tie_embeddings
                                                                else 0)
    return 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
