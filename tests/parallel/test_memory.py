"""Per-rank memory of parameters + gradients + optimizer state under ZeRO-1/2/3 against the ideal total / N.

Counted exactly from the tensors each rank holds (local shards of DTensors), after a real forward/backward/step
on 2 ranks; plus what ZeRO-2 and ZeRO-3 keep between forward and backward (the difference between them).
"""
from __future__ import annotations

import torch

from tests.parallel.conftest import CONFIG, run_fn


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor
    if t is None:
        return 0
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _measure(rank, world, zero_stage):
    """Bytes this rank holds after one step of a 4-layer model (2.2M params) under ``zero_stage``."""
    import torch.nn.functional as F
    from llmforge.core.config import RunConfig, load_config
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    from llmforge.core.optim import build_optimizer
    from llmforge.parallel import build_mesh, parallelize, resolve_dims
    from llmforge.parallel.data_parallel import local_optimizer
    torch.set_num_threads(1)
    over = [f"parallel.zero_stage={zero_stage}", "train.global_batch_size=4", "train.dtype=fp32"]
    over += ["parallel.dp_shard=2"] if zero_stage in (2, 3) else ["parallel.dp_replicate=2"]
    cfg = load_config(RunConfig, CONFIG, over)
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384, vocab_size=512, max_seq_len=64)
    dims = resolve_dims(cfg.parallel, world, args, cfg.train)
    mesh, _ = build_mesh(dims, "cpu")
    torch.manual_seed(0)
    model = Transformer(args)
    total = sum(p.numel() * 4 for p in model.parameters())
    block_total = sum(p.numel() * 4 for p in model.layers.parameters())
    pm = parallelize(model, dims, mesh, cfg, torch.device("cpu"))
    part = pm.parts[0]
    opt = (pm.zero1_optimizers or [build_optimizer([part], cfg.train, torch.device("cpu"))])[0]
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(rank))
    logits = part(x)
    blocks = part.module.layers if hasattr(part, "module") else part.layers
    held_blocks = sum(_local_bytes(p) for p in blocks.parameters())  # between forward and backward
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    opt.step()
    params = sum(_local_bytes(p) for p in part.parameters())
    grads = sum(_local_bytes(p.grad) for p in part.parameters())
    state = local_optimizer(opt).state
    optim = sum(_local_bytes(v) for s in state.values() for k, v in s.items() if k != "step")
    return dict(total=total, block_total=block_total, params=params, grads=grads, optim=optim, held_blocks=held_blocks)


def _measure_all(rank, world):
    return {z: _measure(rank, world, z) for z in (0, 1, 2, 3)}


def test_zero_memory_per_rank(tmp_path):
    per_rank = run_fn(2, _measure_all, tmp=str(tmp_path))
    for zero_stage in (0, 1, 2, 3):
        results = [r[zero_stage] for r in per_rank]
        _check(zero_stage, results)


def _check(zero_stage, results):
    P = results[0]["total"]
    for r, m in enumerate(results):
        ratio = {k: m[k] / (P if k != "optim" else 2 * P) for k in ("params", "grads", "optim")}
        print(f"zero_stage {zero_stage} rank {r}: params {ratio['params']:.3f}  grads {ratio['grads']:.3f}  "
              f"optimizer {ratio['optim']:.3f} of the unsharded size; blocks held after forward "
              f"{m['held_blocks'] / m['block_total']:.3f}")
        ideal = 0.5  # total / N with N = 2
        if zero_stage == 0:
            assert ratio == {"params": 1.0, "grads": 1.0, "optim": 1.0}
        if zero_stage == 1:  # parameters and gradients replicated; AdamW state sharded (whole tensors per rank)
            assert ratio["params"] == ratio["grads"] == 1.0
            assert abs(ratio["optim"] - ideal) < 0.1
        if zero_stage in (2, 3):  # everything sharded (FSDP2 shards each tensor on dim 0: exact halves here)
            assert ratio == {"params": ideal, "grads": ideal, "optim": ideal}
        if zero_stage == 2:  # gathered block parameters are kept from forward until backward
            assert m["held_blocks"] == m["block_total"]
        if zero_stage == 3:  # re-sharded after forward: only this rank's shard stays
            assert m["held_blocks"] == m["block_total"] * ideal
    if zero_stage == 1:  # together the ranks hold exactly one copy of the optimizer state
        assert sum(m["optim"] for m in results) == 2 * P
