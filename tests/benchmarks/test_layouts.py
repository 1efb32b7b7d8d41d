"""A run trained sharded (FSDP2 ZeRO-3, tensor parallel or pipeline parallel over 2 ranks) loads into the adapter
with exactly its saved weights, scores like the same run trained in one process, and its in-training benchmark
(eval.tasks) scored its gathered shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llmforge.inference.lm_eval_adapter import LLMForgeLM  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402
from tests.benchmarks.conftest import TEXTS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAME_AS_BENCH_RUN = ["train.steps=6", "data.seq_len=32", "train.global_batch_size=4", "train.warmup_steps=2",
                     "train.eval_interval=0", "checkpoint.interval=0", "logging.plot=false"]


def _requests():
    return [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(TEXTS)]


LAYOUTS = {"zero3": ["parallel.dp_shard=2", "parallel.zero_stage=3", "parallel.dp_replicate=1"],
           "tp2": ["parallel.tp=2", "parallel.dp_replicate=1"],
           "pp2": ["parallel.pp=2", "parallel.dp_replicate=1"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_run_scores_like_the_single_process_run(layout, bench_run, bench_data, text_tasks, tmp_path):
    run_dir = str(tmp_path / layout)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llmforge.train", "configs/train/tiny-cpu.yaml", f"data.paths=[{bench_data}]",
                          f"run_dir={run_dir}", *SAME_AS_BENCH_RUN, *LAYOUTS[layout], "eval.tasks=[pub_text]",
                          f"eval.include_paths=[{text_tasks}]"],
                         cwd=REPO, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]

    sharded = LLMForgeLM(run_dir=run_dir, batch_size=3)
    got = sharded.loglikelihood_rolling(_requests())

    # the same checkpoint read with plain DCP into an unsharded model: the adapter's numbers exactly
    ckpt = sharded.checkpoint
    model = Transformer(sharded.model.args)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=ckpt)
    model.load_state_dict(state["model"])
    by_hand = LLMForgeLM(model=model.eval(), tokenizer=sharded.sp, batch_size=1).loglikelihood_rolling(_requests())
    assert got == pytest.approx(by_hand, rel=1e-6)

    # the layout changes the trained weights only by float summation order (~1e-6)
    single = load_run(bench_run)
    ref = LLMForgeLM(model=single.model, tokenizer=single.tokenizer, batch_size=3).loglikelihood_rolling(_requests())
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    print(f"{layout} vs 1 process: max relative difference of per-document log-likelihoods {worst:.1e}")
    assert worst < 1e-4
    assert torch.equal(torch.tensor(sharded.step), torch.tensor(single.step))

    # eval.tasks during that run: the shards gathered on rank 0 scored like the final checkpoint
    from llmforge.inference.benchmarks import run_tasks_on_model
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    logged = [r for r in rows if "pub_text/bits_per_byte" in r]
    assert [r["step"] for r in logged] == [6]
    want = run_tasks_on_model(sharded.model, sharded.sp, ["pub_text"], text_tasks)["pub_text/bits_per_byte"]
    assert logged[0]["pub_text/bits_per_byte"] == pytest.approx(want, rel=1e-6)
