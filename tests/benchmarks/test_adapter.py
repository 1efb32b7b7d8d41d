"""The native lm-eval adapter against hand-computed log-likelihoods, across batch sizes, and bits per byte against
llmforge.eval's loss on the same text."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llmforge.inference.eval import main as eval_main  # noqa: E402
from llmforge.inference.lm_eval_adapter import LLMForgeLM  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402
from tests.benchmarks.conftest import TEXTS, write_text_task  # noqa: E402

PAIRS = [("The model learns", " from data"), ("Tests check numbers", " against references so nothing drifts"),
         ("", "Install the package."), ("A small language model on text:", " bytes count too.")]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def _by_hand(model, ids: list[int], n_scored: int) -> float:
    """Sum of log p over the last n_scored tokens of ``ids``, one unbatched forward."""
    logp = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    target = torch.tensor(ids[1:])
    return logp[torch.arange(len(ids) - 1), target][-n_scored:].sum().item()


@pytest.fixture(scope="module")
def loaded(bench_run):
    return load_run(bench_run)


def test_loglikelihood_and_rolling_equal_hand_computed_sums(loaded):
    lm = LLMForgeLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=3)
    sp, eos = loaded.tokenizer, loaded.tokenizer.eos_id()
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    for (ctx, cont), (ll, _) in zip(PAIRS, got):
        if ctx:  # lm-eval's split: encode the whole text, the context alone, continuation = the rest
            whole, head = sp.encode(ctx + cont), sp.encode(ctx)
            ids, n = whole, len(whole) - len(head)
        else:    # empty context: the continuation starts a document, i.e. follows EOS
            ids, n = [eos] + sp.encode(cont), len(sp.encode(cont))
        assert ll == pytest.approx(_by_hand(loaded.model, ids, n), rel=1e-5)
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    for text, ll in zip(TEXTS, rolling):  # a document = EOS then its tokens, every token scored once
        ids = [eos] + sp.encode(text)
        assert ll == pytest.approx(_by_hand(loaded.model, ids, len(ids) - 1), rel=1e-5)


def test_rolling_windows_longer_than_the_context(loaded):
    """A document longer than max_length is cut into windows that each score new tokens only (sum = whole doc
    scored with the longest context the window allows)."""
    text = " ".join(TEXTS * 3)
    short = LLMForgeLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=2, max_length=16)
    ids = [loaded.tokenizer.eos_id()] + loaded.tokenizer.encode(text)
    expected, pos = 0.0, 1
    while pos < len(ids):  # predict ids[pos:pos+k] from at most 16 tokens of input ending right before them
        end = min(pos + 16, len(ids))
        window = ids[max(0, end - 17):end]
        expected += _by_hand(loaded.model, window, end - pos)
        pos = end
    (got,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert len(ids) > 40
    assert got == pytest.approx(expected, rel=1e-5)


def test_results_do_not_depend_on_the_batch_size(loaded):
    rolling = _requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    pairs = _requests("loglikelihood", PAIRS)
    outs = []
    for bs in (1, 3, 16):
        lm = LLMForgeLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=bs)
        outs.append((lm.loglikelihood_rolling(rolling), [ll for ll, _ in lm.loglikelihood(pairs)],
                     [g for _, g in lm.loglikelihood(pairs)]))
    for other in outs[1:]:
        assert other[2] == outs[0][2]
        for a, b in zip(other[0] + other[1], outs[0][0] + outs[0][1]):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(loaded):
    """Batched (equal-length contexts share a forward) or not, each output is llmforge.generate's greedy
    continuation of that context, cut before the first stop string."""
    from llmforge.inference.generate import generate
    sp = loaded.tokenizer
    contexts = ["The model learns", "Tests check numbers", "The model learns", "Install the package"]
    reqs = _requests("generate_until", [(c, {"until": ["."], "max_gen_toks": 12}) for c in contexts])
    expected = []
    for ctx in contexts:
        ids = sp.encode(ctx)
        new = generate(loaded.model, ids, 12, temperature=0.0, eos_id=sp.eos_id())
        expected.append(sp.decode(ids + new)[len(sp.decode(ids)):].split(".")[0])
    for bs in (1, 4):
        lm = LLMForgeLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=bs)
        assert lm.generate_until(reqs) == expected


def test_bits_per_byte_equals_llmforge_eval_loss_on_the_same_text(bench_run, tmp_path):
    """One document as a validation shard [EOS, doc tokens] of exactly seq_len + 1 tokens: llmforge.eval's mean
    loss over its seq_len targets, times seq_len, is the document's negative log-likelihood in nats, so
    bits per byte = loss * seq_len / (UTF-8 bytes * ln 2), the number lm-eval reports for the same text."""
    from data_pipeline.shards import ShardWriter
    sp = load_run(bench_run).tokenizer
    text = " ".join(TEXTS)
    ids = [sp.eos_id()] + sp.encode(text)
    data = tmp_path / "one_doc"
    with ShardWriter(str(data / "shards" / "train-00000")) as w:
        w.add_document(ids)
    with ShardWriter(str(data / "shards" / "valid-00000")) as w:
        w.add_document(ids)
    assert eval_main([bench_run, f"data.paths=[{data}]", f"data.seq_len={len(ids) - 1}", "--batches", "0"]) == 0
    ev = json.load(open(os.path.join(bench_run, "eval.json")))
    assert ev["tokens"] == len(ids) - 1
    bpb_eval = ev["loss"] * ev["tokens"] / (len(text.encode("utf-8")) * math.log(2))

    tasks = write_text_task(str(tmp_path / "tasks"), "one_doc", [text])
    assert eval_main([bench_run, "--tasks", "one_doc", "--include-path", tasks]) == 0
    res = json.load(open(os.path.join(bench_run, "eval_tasks.json")))
    assert res["metrics"]["one_doc/bits_per_byte"] == pytest.approx(bpb_eval, rel=1e-5)
