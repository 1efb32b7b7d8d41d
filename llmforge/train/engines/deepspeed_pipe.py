"""DeepSpeed's pipeline parallelism (engine=deepspeed, parallel.pp > 1): the decoder cut into stage layers for
deepspeed.pipe.PipelineModule, and validation through PipelineEngine.eval_batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from llmforge.core.loss import loss_fn


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
    module = PipelineModule(layers=layers, num_stages=pp, loss_fn=loss_fn, partition_method="uniform")
    # DeepSpeed sums gradient norms over the stages of a pipeline only for parameters marked model-parallel
    # (Megatron's attribute); unmarked ones count on stage 0 alone, which clips with a wrong norm. Every
    # parameter here lives on exactly one stage, so the mark is true.
    for p in module.parameters():
        p.model_parallel = True
    return module


def pipe_eval(engine):
    """Validation loss through PipelineEngine.eval_batch (full micro batches; the mean over equal-size micro
    batches is the token mean the native evaluate() reports)."""
    from llmforge.data.streams import validation_batches

    def evaluate(valid, micro, max_batches, device, amp):
        batches = [b for b in validation_batches(valid, micro, max_batches) if len(b) == micro]
        if not batches:
            return float("nan"), 0
        it = iter([(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches])
        loss = engine.eval_batch(it, num_micro_batches=len(batches))
        return float(loss.float().item()), sum(b[:, 1:].numel() for b in batches)
    return evaluate
