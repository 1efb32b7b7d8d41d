"""Emulated float8 (torchao) in data-parallel and pipeline layouts equals single-process float8: the same block
linears convert before any parallelism and FSDP2 gathers the whole weight before its float8 cast. Dynamic scales
of activations and gradients come from each micro batch's largest value, so the reference runs the same micro
batches (4 sequences, accumulated) that each rank or pipeline microbatch sees; then the scales and the rounding
are one process's.

Tolerance: float8 (e4m3, 3 mantissa bits) turns a 1e-7 difference of summation order (FSDP's reduce-scatter
against local accumulation, another CPU's matmul kernels) into a whole rounding step of an element when it
lands near a grid midpoint. On one machine zero3_dp2 matched to 1e-6, on another to 1.4e-4 (loss) and 8.6e-4
(gradient norm), both in 6 steps; a wrong scale or a missed conversion is off by orders of magnitude more."""
from __future__ import annotations

import pytest

from tests.parallel.test_layouts import Z3, assert_matches_reference

pytest.importorskip("torchao.float8")
F8 = ["train.float8=true", "train.float8_emulate=true"]
LAYOUTS = {
    "float8_zero3_dp2": (2, Z3),
    "float8_ddp2": (2, ["parallel.dp_replicate=2"]),
}
# pp2 (2 microbatches of 4) tracks the same reference to ~1.4e-5 in loss and ~1e-3 in the gradient norm, not to
# 1e-5: not yet explained, so not claimed here
MICRO4 = ["train.micro_batch_size=4"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_float8_layout_matches_single_process_float8(runner, name):
    nproc, overrides = LAYOUTS[name]
    ref = runner.reference([*F8, *MICRO4])
    run_dir = runner.run(name, nproc, [*F8, *overrides], timeout=300)
    assert_matches_reference(run_dir, ref, name, same_eval_windows=False, tol=2e-3, param_tol=2e-3)
