"""Tensor parallelism (Megatron-LM style) with DTensor ``parallelize_module``, plus sequence parallelism.

Per block: wq/wk/wv and w1/w3 are column-parallel (each rank computes a slice of the heads / of the MLP hidden
units), wo and w2 are row-parallel (partial sums reduced). The model reshapes attention with ``-1`` heads, so it
runs unchanged on the local heads. Token (and GPT-2 position) embeddings are vocab-/row-parallel; the output
head is column-parallel over the vocabulary and gathers the logits (``Replicate``), so the loss function is the
ordinary one and identical on every TP rank; with ``parallel.loss_parallel`` it returns them sharded over the
vocabulary instead (a DTensor) and ``llmforge.core.loss`` computes the cross-entropy on the shards.

With ``parallel.sequence_parallel`` the residual stream between blocks is split along the sequence (Shard(1)):
norms run on 1/tp of the tokens, and the all-reduces of plain TP become reduce-scatter + all-gather pairs.
A mixture-of-experts block is not split over tp: every tp rank runs the whole MoE (router, its experts, expert
parallelism's all-to-all) on the full sequence of its data-parallel batch, gathered under sequence parallelism
and re-split after, so its parameters get the same full gradient on every tp rank and need no reduction.
Under pipeline parallelism a stage hands the next one the full sequence (``sequence_parallel_stage_io``) so that
stage shapes and the RoPE positions derived from them do not depend on tp.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool = False) -> None:
    """Shard ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place. With
    ``loss_parallel`` the logits stay a DTensor sharded over the vocabulary (``llmforge.core.loss`` works on shards)."""
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # layout of the residual stream between blocks
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if getattr(model, "pos_embeddings", None) is not None:  # (seq, dim) table lookup: its rows are the sequence
        top["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                output_layouts=Shard(0) if sp else Replicate())
    if model.norm is not None and sp:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    tied = model.args.tie_embeddings and model.tok_embeddings is not None and model.output is not None
    if tied:  # both sides shard dim 0 (vocab) of the one weight: re-tie the distributed parameter
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
        }
        if block.feed_forward is not None:
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=stream)
            if block.feed_forward.w3 is not None:
                plan["feed_forward.w3"] = ColwiseParallel()
        if sp:
            plan.update({
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # attention(x, cos, sin, cache, start_pos, layout): gather the sequence for x only
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None, None, None)),
            })
            if block.feed_forward is not None:
                plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                          desired_input_layouts=(Replicate(),))
            else:  # the MoE sees the whole sequence as a plain tensor and hands back its tp slice
                plan["moe"] = PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                       use_local_input=True, output_layouts=(Replicate(),),
                                                       desired_output_layouts=(Shard(1),), use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def _reshard_seq(x, mesh: DeviceMesh, src, dst):
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [src], run_check=False)
    return x.redistribute(mesh, [dst]).to_local()


def sequence_parallel_stage_io(stage: nn.Module, tp_mesh: DeviceMesh, is_first: bool, is_last: bool) -> None:
    """Pipeline stages exchange full-sequence activations: gather at a stage's end, re-split where the next
    stage's sequence-parallel region begins (its first block, or its final norm when it has no blocks).
    Autograd does the mirror image (the gradient of the gather is a local slice and vice versa)."""
    if not is_last:
        stage.register_forward_hook(lambda mod, args, out: _reshard_seq(out, tp_mesh, Shard(1), Replicate()))
    if not is_first:
        entry = next(iter(stage.layers.values()), None)
        entry = stage.norm if entry is None else entry
        entry.register_forward_pre_hook(
            lambda mod, args: (_reshard_seq(args[0], tp_mesh, Replicate(), Shard(1)), *args[1:]), prepend=True)
