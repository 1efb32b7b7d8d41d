"""LoRA (train.lora.rank): the adapters train in every layout but tensor parallel exactly as in one process, the
base weights stay bit-identical, resume and init_from keep working, and the export / eval / generate model is
the merged one (its logits equal the adapted model's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.parallel.conftest import final_params, max_rel
from tests.sft.conftest import train
from tests.sft.test_sft_layouts import SFT, _args, _metrics

LORA = ["train.lora.rank=4", "train.lora.alpha=8", "train.lr=1e-2"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def lora_eval(tmp_path_factory) -> list[str]:
    """An in-training benchmark (eval.tasks) at the end of the run: it scores the gathered, merged adapters."""
    pytest.importorskip("lm_eval")
    from tests.benchmarks.conftest import write_text_task
    folder = write_text_task(str(tmp_path_factory.mktemp("lora_tasks")), "lora_text",
                             ["amber basil cedar dune", "reverse these words please", "maple nectar onyx pine"])
    return ["eval.tasks=[lora_text]", f"eval.include_paths=[{folder}]"]


@pytest.fixture(scope="module")
def lora_ref(sft_env, pre_run, lora_eval, tmp_path_factory):
    run = train(str(tmp_path_factory.mktemp("lora") / "run"), SFT, *_args(sft_env, pre_run, *LORA,
                                                                           "checkpoint.interval=4", *lora_eval))
    return run, _metrics(run)


def _benchmark(run_dir: str) -> float:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return [r["lora_text/bits_per_byte"] for r in rows if "lora_text/bits_per_byte" in r][-1]


def test_only_adapters_train_and_the_merged_model_is_the_adapted_one(pre_run, lora_eval, lora_ref, tmp_path):
    from llmforge.model.lora import add_adapters, merge
    from llmforge.inference.run_loading import load_run
    run, (loss, _) = lora_ref
    before, after = final_params(pre_run), final_params(run)
    adapters = [k for k in after if k.endswith((".lora_a", ".lora_b"))]
    assert len(adapters) == 2 * 7 * 2  # 2 blocks x 7 linears x (A, B)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight moved"
    assert all(after[k].abs().max() > 0 for k in adapters if k.endswith(".lora_b")), "B left at its zero init"
    assert loss[4] < loss[1]

    merged = load_run(run).model  # what eval, generate and export_hf use
    assert not any(".lora_" in k for k in merged.state_dict())
    adapted = load_run(run).model
    adapted.load_state_dict(before)  # the base weights + the run's adapters, unmerged
    add_adapters(adapted, 4, 8.0)
    adapted.load_state_dict(after)
    tokens = torch.randint(0, merged.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    from llmforge.inference.benchmarks import run_tasks_on_model, unsharded_copy  # what in-training benchmarks score
    scored = run_tasks_on_model(merged, load_run(run).tokenizer, ["lora_text"], lora_eval[1].split("=[")[1][:-1])
    assert _benchmark(run) == pytest.approx(scored["lora_text/bits_per_byte"], rel=1e-6)
    gathered = unsharded_copy([adapted], adapted.args, str(tmp_path / "gather"))
    with torch.no_grad():
        want = adapted(tokens)
        assert (gathered(tokens) - want).abs().max() < 1e-5
        assert (want - merge(adapted)(tokens)).abs().max() < 1e-5
        assert (merged(tokens) - want).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [("ddp2", []), ("zero1", ["parallel.zero_stage=1"]),
                                         ("zero3", ["parallel.zero_stage=3"]),
                                         ("pp2", ["parallel.pp=2", "parallel.pp_schedule=1F1B"])])
def test_lora_layout_equals_one_process(sft_env, pre_run, lora_eval, lora_ref, tmp_path, name, layout):
    ref_dir, (ref_loss, ref_val) = lora_ref
    run = train(str(tmp_path / name), SFT, *_args(sft_env, pre_run, *LORA, "checkpoint.interval=4",
                                                  "train.micro_batch_size=2", *lora_eval, *layout), nproc=2)
    loss, val = _metrics(run)
    assert max_rel(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert max_rel(val, ref_val) <= 1e-5, (val, ref_val)
    got, want = final_params(run), final_params(ref_dir)
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    assert _benchmark(run) == pytest.approx(_benchmark(ref_dir), rel=1e-5)


def test_resume_refusals_and_export(sft_env, pre_run, lora_ref, tmp_path):
    run, _ = lora_ref
    # resuming with another rank is refused up front, naming the key
    res = subprocess.run([sys.executable, "-m", "llmforge.train", os.path.join(run, "config.yaml"),
                          "train.lora.rank=8", "train.steps=6", "logging.plot=false"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode != 0 and "train.lora.rank changed (4 -> 8)" in res.stderr + res.stdout
    # fine-tuning onwards from a LoRA run asks for its (merged) export
    res = subprocess.run([sys.executable, "-m", "llmforge.train", SFT, f"train.init_from={run}",
                          f"data.paths=[{sft_env['data']}]", f"run_dir={tmp_path / 'next'}", "train.steps=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode != 0 and "trained LoRA adapters" in res.stderr + res.stdout
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "-m", "llmforge.export_hf", run, str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.torch import load_file
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert json.load(open(out / "config.json"))["num_hidden_layers"] == 2
    # LoRA on top of a Hugging Face folder, through both ways in: the adapters are left out of the import
    for key in ("train.init_from", "train.init_from_hf"):
        again = train(str(tmp_path / key), SFT, *_args(sft_env, pre_run, *LORA, "train.steps=1")[1:],
                      "train.init_from=", f"{key}={out}")
        merged_start = final_params(again)
        assert torch.equal(merged_start["layers.1.feed_forward.w2.weight"],
                           weights["model.layers.1.mlp.down_proj.weight"]), key
