"""Fine-tuning end to end: response-only loss, generation, init from a run dir / an HF folder, freezing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.parallel.conftest import final_params
from tests.sft.conftest import train

SFT = "configs/train/sft-tiny.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """load_run/export in this process open a world-1 group; forked trainer ranks must not inherit it."""
    from llmforge.core.distributed import destroy
    destroy()
    yield
    destroy()


def _ft(sft_env, run_dir, *extra, init=None, **kw):
    return train(run_dir, SFT, f"train.init_from={init}", f"data.paths=[{sft_env['data']}]", "data.seq_len=32",
                 "train.eval_interval=0", "checkpoint.interval=0", *extra, **kw)


def _rows(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl")) if line.strip()]


def _held_in(sft_env):
    """Rows of the train split (doc ids are rows.jsonl:<line>)."""
    ids = open(os.path.join(sft_env["data"], "doc_ids", "train-00000.txt")).read().split()
    return [sft_env["rows"][int(i.rsplit(":", 1)[1]) - 1] for i in ids]


@pytest.fixture(scope="module")
def noise_run(sft_env, pre_run, tmp_path_factory):
    return _ft(sft_env, str(tmp_path_factory.mktemp("noise") / "ft"), "train.steps=100", "train.lr=3e-3",
               "train.warmup_steps=5", "train.log_interval=10", init=pre_run)


@pytest.mark.slow
def test_noise_prompts_response_only_loss_near_zero_and_greedy_answers_exact(sft_env, noise_run):
    """Prompts are random words; the response is the prompt reversed. Scoring only the response, the loss goes to
    ~0 (the prompt tokens themselves are unpredictable: counting them would keep it high)."""
    from llmforge.inference.eval import run_eval
    from llmforge.inference.generate import generate
    from llmforge.inference.run_loading import load_run
    from llmforge.common.chat import chat_prompt_ids
    from llmforge.core.loss import IGNORE_INDEX as IGNORE, split_batch
    run = noise_run
    losses = [r["loss"] for r in _rows(run) if "loss" in r]
    assert losses[-1] < 0.05 < losses[0]
    loaded = load_run(run)
    tok, model = loaded.tokenizer, loaded.model
    for row in _held_in(sft_env):
        ids = chat_prompt_ids(run, row["prompt"])
        assert tok.decode(generate(model, ids, 16, temperature=0.0, eos_id=tok.eos_id())) == row["response"]
    # the same model scored on every token of the training conversations: the random prompts dominate
    from llmforge.data.sft import build_any_datasets as build_datasets
    stream, valid = build_datasets(loaded.cfg.data, loaded.cfg.seed)
    batch = stream.batch(0, 16)
    x, y = split_batch(batch)
    ids = torch.where(batch >= 0, batch, -1 - batch)[:, 1:]
    every = torch.where(ids != tok.pad_id(), ids, IGNORE)  # all conversation tokens, padding excluded
    with torch.no_grad():
        logits = model(x).flatten(0, 1)
    masked, everything = (F.cross_entropy(logits, t.flatten(), ignore_index=IGNORE).item() for t in (y, every))
    assert masked < 0.05 and everything > 0.5
    # eval: response-only loss on the validation split, its token count = the validation mask's ones
    result = run_eval(run)
    mask_ones = sum(int(np.asarray(valid[0].window(i)[1:] >= 0).sum()) for i in range(len(valid[0])))
    assert result["tokens"] == mask_ones and result["response_only"] is True and result["whole_split"] is True


def test_init_from_run_dir_and_hf_folder_start_from_the_same_weights(sft_env, pre_run, tmp_path):
    from llmforge.export_hf import export_run
    hf = str(tmp_path / "hf")
    export_run(pre_run, hf)
    from llmforge.core.distributed import destroy
    destroy()
    start = final_params(pre_run)
    for name, src in (("from-run", pre_run), ("from-hf", hf)):
        run = _ft(sft_env, str(tmp_path / name), "train.steps=0", init=src)
        got = final_params(run)
        assert sorted(got) == sorted(start)
        assert all(torch.equal(got[k], start[k]) for k in start), name


def test_freeze_keeps_frozen_parameters_bit_identical(sft_env, pre_run, tmp_path):
    run = _ft(sft_env, str(tmp_path / "frozen"), "train.steps=4", "train.freeze=[embeddings,blocks:1]", init=pre_run)
    before, after = final_params(pre_run), final_params(run)
    frozen = [k for k in before if k.startswith(("tok_embeddings.", "layers.0."))]
    trained = [k for k in before if k.startswith(("layers.1.", "output.", "norm."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_bad_init_from_and_freeze_are_one_line_errors(sft_env, pre_run, tmp_path, capfd):
    _ft(sft_env, str(tmp_path / "a"), init=str(tmp_path / "missing"), expect_ok=False)
    _ft(sft_env, str(tmp_path / "b"), "train.freeze=[blocks:7]", init=pre_run, expect_ok=False)
    logs = open(str(tmp_path / "a") + ".rank0.log").read() + open(str(tmp_path / "b") + ".rank0.log").read()
    assert "error: train.init_from: no such folder" in logs
    assert "error: train.freeze: blocks:7 but the model has 2 blocks" in logs


@pytest.mark.slow
def test_generate_cli_and_hf_export_apply_the_chat_template(sft_env, noise_run, tmp_path, capsys):
    from data_pipeline.sft import ChatTemplate
    from llmforge.export_hf import main as export_main
    from llmforge.inference.generate import main as generate_main
    row = _held_in(sft_env)[0]
    assert generate_main([noise_run, "--prompt", row["prompt"], "--greedy", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == row["response"]
    out = str(tmp_path / "hf")
    assert export_main([noise_run, out]) == 0
    assert "chat template in the tokenizer config" in capsys.readouterr().out
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    ours = ChatTemplate(os.path.join(noise_run, "tokenizer.model"))
    msgs = [{"role": "system", "content": "amber basil"}, {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}, {"role": "user", "content": "kelp  lotus\n maple"}]
    assert list(tok.apply_chat_template(msgs[:3], tokenize=True, return_dict=False)) == ours.encode(msgs[:3])[0]
    assert list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)) == \
        ours.encode_prompt(msgs)
