"""Single-process checks of the pieces: recomputation wraps the right blocks and keeps checkpoint names; pipeline
stages keep the whole model's parameter names and together hold each parameter exactly once."""
from __future__ import annotations

import dataclasses

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from llmforge.model.presets import PRESETS
from llmforge.model.transformer import Transformer
from llmforge.parallel import ParallelDims
from llmforge.parallel.pipeline import split_model
from llmforge.parallel.recompute import apply_recompute


def _model(n_layers=4):
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=64, n_layers=n_layers))


def test_recompute_wraps_blocks_and_keeps_state_dict_names():
    names = set(get_model_state_dict(_model()))
    for mode, every, wrapped in (("full", 1, [0, 1, 2, 3]), ("full", 2, [0, 2]), ("selective", 1, [0, 1, 2, 3])):
        model = _model()
        apply_recompute(model, mode, every)
        assert [i for i, b in enumerate(model.layers.values()) if isinstance(b, CheckpointWrapper)] == wrapped
        assert set(get_model_state_dict(model)) == names
        x = torch.randint(0, 64, (2, 16))
        torch.testing.assert_close(model(x), _model()(x))


def test_pipeline_stages_partition_the_parameters_under_their_own_names():
    full = dict(_model(n_layers=3).named_parameters())
    for schedule, pp, spr in (("1F1B", 3, 1), ("Interleaved1F1B", 2, 2), ("ZBVZeroBubble", 2, 2)):
        dims = ParallelDims(pp=pp, dp_replicate=1, dp_shard=1, tp=1, world_size=pp, pp_stages_per_rank=spr)
        seen = []
        for rank in range(pp):
            for part in split_model(_model(n_layers=3), dims, schedule, rank)[1]:
                for name, p in part.named_parameters():
                    assert torch.equal(p, full[name]), name
                    seen.append(name)
        assert sorted(seen) == sorted(full), schedule
