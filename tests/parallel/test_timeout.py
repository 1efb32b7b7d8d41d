"""A rank that stops participating makes the others fail within ``dist.timeout_s`` (not the 30-minute c10d default
of the mesh sub-groups), with one line naming the failing rank and where it was waiting."""
from __future__ import annotations

import functools
import os
import time

import pytest

TIMEOUT_S = 4


def _stall_rank1_at_step3(stamp: str, rank: int) -> None:
    """A rank patch (picklable: ranks start from a forkserver)."""
    from llmforge.train.engines.native import NativeEngine
    original, calls = NativeEngine.forward_backward, [0]

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            open(stamp, "w").write(str(time.time()))
            time.sleep(120)  # stops participating; the test kills it once rank 0 has failed
        return original(*args, **kwargs)
    NativeEngine.forward_backward = forward_backward


@pytest.mark.parametrize("layout,where", [
    (["parallel.dp_replicate=2"], "forward_backward (llmforge/parallel/parallel_model.py"),                      # DDP all-reduce
    (["parallel.pp=2"], "pipeline_forward_backward (llmforge/parallel/pipeline.py"),          # pipeline p2p
    # 4 ranks: rank 0 waits on its TP sub-group (ranks 0-1), a mesh group that is not the world group
    # (without build_mesh's _set_pg_timeout it hangs for c10d's 30-minute default instead)
    (["parallel.tp=2", "parallel.dp_shard=2", "parallel.zero_stage=3"], "forward (llmforge/model/blocks.py"),
], ids=["ddp", "pp", "fsdp_tp_subgroup"])
def test_stalled_rank_fails_the_others_within_the_timeout(runner, layout, where):
    name = "timeout_" + layout[0].split(".")[1].split("=")[0]
    nproc = 4 if "parallel.tp=2" in layout else 2
    stamp = os.path.join(runner.root, name + ".stall")
    run_dir = runner.run(name, nproc, [*layout, f"dist.timeout_s={TIMEOUT_S}"], patch=functools.partial(_stall_rank1_at_step3, stamp),
                         expect_ok=False, timeout=90, grace=1)
    rc0 = runner.last_exit_codes[0]
    waited = runner.ended[0] - float(open(stamp).read())
    err = [line for line in open(f"{run_dir}.rank0.log").read().splitlines() if line.startswith("error:")]
    print(f"RESULT timeout {name}: rank 0 exited {rc0} {waited:.1f}s after rank 1 stalled: {err}")
    assert rc0 == 3
    assert TIMEOUT_S - 0.5 <= waited < TIMEOUT_S + 15
    assert len(err) == 1 and err[0].startswith(f"error: rank 0 of {nproc}: collective failed in " + where), err
    assert "another rank stopped participating" in err[0]
