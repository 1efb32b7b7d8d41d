"""sft.pack: whole conversations packed into each sample, attending only within themselves. The response-only loss
equals the unpacked one (per token, per step of a run, in ddp2 / zero3 / tp2 / pp2 layouts), the padding shrinks,
packing is a pure function of the lengths (resume gives the same run), and pretraining data refuses it
(engine=deepspeed: tests/engines/test_key_policy.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmforge.core.loss import IGNORE_INDEX, split_batch
from llmforge.core.packing import DOC_START, batch_positions, raw_ids
from llmforge.data.sft import SFTDocs, greedy_packs
from llmforge.data.streams import _shard_prefixes
from tests.parallel.conftest import final_params, max_rel, param_max_diff
from tests.sft.conftest import assert_killed_run_resumes_bitwise, train

SFT = "configs/train/sft-tiny.yaml"
SEQ = 64  # the fixture's conversations are 17-23 tokens: 2-3 per pack


def _docs(sft_env, pack: bool, split: str = "train", seq_len: int = SEQ) -> SFTDocs:
    return SFTDocs(_shard_prefixes(sft_env["data"], split), seq_len, 3, pack=pack)


def test_greedy_packs_keep_stored_order_and_put_a_long_conversation_alone():
    assert greedy_packs(np.array([5, 5, 3, 20, 2, 2, 9]), 10).tolist() == [0, 2, 3, 4, 6, 7]
    assert greedy_packs(np.array([10, 1, 11]), 10).tolist() == [0, 1, 2, 3]
    assert greedy_packs(np.zeros(0, np.int64), 10).tolist() == [0]


@pytest.mark.parametrize("seq_len", [SEQ, 20])  # 20: most conversations are longer than a sample, cut alone
def test_packs_hold_the_unpacked_rows_back_to_back(sft_env, seq_len):
    plain, packed = _docs(sft_env, False, seq_len=seq_len), _docs(sft_env, True, seq_len=seq_len)
    n = seq_len + 1
    assert packed.conversations() == len(plain) and len(packed) <= len(plain)
    for i in range(len(packed)):
        w, used = packed.window(i), 0
        for c in range(int(packed.packs[i]), int(packed.packs[i + 1])):
            row, size = plain.window(c), min(int(plain.lengths[c]), n)
            part = w[used:used + size]
            assert raw_ids(torch.from_numpy(part[None]))[0, 0].item() == row[0]  # marked, never a target
            assert abs(int(part[0])) >= DOC_START and part[0] < 0
            np.testing.assert_array_equal(part[1:], row[1:size])  # the same ids and loss mask
            used += size
        assert used <= n and (w[used:] == packed.pad).all()  # padding only at the end
    assert packed.packs[-1] == len(plain)  # every conversation once, in stored order


def _per_token_losses(model, batch, positions):
    x, y = split_batch(batch)
    with torch.no_grad():
        logits = model(x, positions=positions)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                           ignore_index=IGNORE_INDEX).view(y.shape)
    return ce, y != IGNORE_INDEX


def test_packed_loss_equals_unpacked_per_token_and_normalised(sft_env):
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=448, max_seq_len=128)).eval()
    plain, packed = _docs(sft_env, False), _docs(sft_env, True)
    ub = torch.from_numpy(np.stack([plain.window(i) for i in range(len(plain))]))
    pb = torch.from_numpy(np.stack([packed.window(i) for i in range(len(packed))]))
    u_ce, u_on = _per_token_losses(model, ub, None)
    p_ce, p_on = _per_token_losses(model, pb, batch_positions(pb))
    assert int(u_on.sum()) == int(p_on.sum()) > 0
    # conversation c's scored tokens in its own row and in its pack, in order
    per_conv_packed = []
    for i in range(len(packed)):
        starts = ((pb[i, :-1].abs() >= DOC_START).nonzero().flatten().tolist()) + [SEQ]
        for s, e in zip(starts[:-1], starts[1:]):
            per_conv_packed.append(p_ce[i, s:e][p_on[i, s:e]])
    per_conv_packed = per_conv_packed[:len(plain)]
    for c in range(len(plain)):
        torch.testing.assert_close(per_conv_packed[c], u_ce[c][u_on[c]], rtol=0, atol=1e-5)
    u_loss, p_loss = u_ce[u_on].sum() / u_on.sum(), p_ce[p_on].sum() / p_on.sum()
    assert abs(float(u_loss - p_loss)) <= 1e-5 * float(u_loss)
    # without positions a later conversation would see the earlier ones: the loss differs
    leak, _ = _per_token_losses(model, pb, None)
    assert (leak[p_on] - p_ce[p_on]).abs().max() > 1e-3


def _args(sft_env, pre_run, *extra):
    return [f"train.init_from={pre_run}", f"data.paths=[{sft_env['data']}]", f"data.seq_len={SEQ}",
            "train.steps=4", "train.lr=3e-3", "train.warmup_steps=1", "train.eval_interval=2",
            "train.eval_batches=1", "checkpoint.interval=0", "seed=5", *extra]


def _metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


def _pack_line(run_dir):
    lines = [ln for ln in open(f"{run_dir}.rank0.log").read().splitlines() if ln.startswith("sft.pack: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_a_packed_run_equals_the_unpacked_run_with_fewer_pad_tokens(sft_env, pre_run, tmp_path):
    """One global batch = every training conversation (19 rows unpacked, 7 packs): each step of both runs sees
    the same conversations, so the losses (response-only, normalised by the step's response tokens), the
    validation losses (every held-out conversation) and the weights agree."""
    plain, packed = _docs(sft_env, False), _docs(sft_env, True)
    ref = train(str(tmp_path / "plain"), SFT, *_args(sft_env, pre_run, f"train.global_batch_size={len(plain)}"))
    run = train(str(tmp_path / "packed"), SFT, *_args(sft_env, pre_run, f"train.global_batch_size={len(packed)}",
                                                       "sft.pack=true"))
    (loss, val), (ref_loss, ref_val) = _metrics(run), _metrics(ref)
    assert len(loss) == 4 and max_rel(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert len(val) == 2 and max_rel(val, ref_val) <= 1e-5, (val, ref_val)
    assert param_max_diff(final_params(run), final_params(ref)) < 1e-4
    pad, unpacked = packed.padding()
    n = SEQ + 1
    line = _pack_line(run)
    p, q = 100 * pad / (len(packed) * n), 100 * unpacked / (len(plain) * n)  # 19.1% vs 70.2% here
    assert line == (f"sft.pack: {len(plain)} conversations in {len(packed)} samples of {n} tokens, "
                    f"{p:.1f}% padding (unpacked: {q:.1f}%)")
    assert pad < unpacked and float(line.split(", ")[1].split("%")[0]) < float(line.split("unpacked: ")[1][:-2])
    assert "sft.pack" not in open(f"{ref}.rank0.log").read()
    # llmforge.eval of the packed run scores the validation packs: the same response tokens and loss
    from llmforge.core.distributed import destroy
    from llmforge.inference.eval import run_eval
    try:
        got, want = run_eval(run), run_eval(ref)
    finally:
        destroy()  # run_eval opened a world-1 group: forked trainer ranks must not inherit it
    assert got["tokens"] == want["tokens"] and got["whole_split"] and want["whole_split"]
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"]


@pytest.fixture(scope="module")
def packed_reference(sft_env, pre_run, tmp_path_factory):
    run = train(str(tmp_path_factory.mktemp("packref") / "run"), SFT,
                *_args(sft_env, pre_run, "train.global_batch_size=4", "sft.pack=true"))
    return run, _metrics(run)


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [("ddp2", []), ("zero3", ["parallel.zero_stage=3"]), ("tp2", ["parallel.tp=2"]),
                                         ("pp2", ["parallel.pp=2", "parallel.pp_schedule=1F1B"]),
                                         ("cp2", ["parallel.cp=2"])])
def test_packed_two_processes_equal_one(sft_env, pre_run, packed_reference, tmp_path, name, layout):
    ref_dir, (ref_loss, ref_val) = packed_reference  # one process, one micro batch of 4 packs per step
    run = train(str(tmp_path / name), SFT, *_args(sft_env, pre_run, "train.global_batch_size=4",
                                                  "train.micro_batch_size=1", "sft.pack=true", *layout), nproc=2)
    loss, val = _metrics(run)
    assert max_rel(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert max_rel(val, ref_val) <= 1e-5, (val, ref_val)
    assert param_max_diff(final_params(run), final_params(ref_dir)) < 1e-4


@pytest.mark.slow
def test_packed_run_killed_mid_way_resumes_to_the_same_losses(sft_env, pre_run, tmp_path):
    # 3 packs per step over 7 packs: steps cross epochs (a new permutation) on both sides of the kill
    args = _args(sft_env, pre_run, "train.steps=6", "train.global_batch_size=3", "checkpoint.interval=2",
                 "sft.pack=true")
    assert_killed_run_resumes_bitwise(str(tmp_path), SFT, args)


def test_pretraining_data_refuses_sft_pack_in_one_line(sft_env, tmp_path, capsys):
    from llmforge.train import main
    rc = main(["configs/train/tiny-cpu.yaml", f"data.paths=[{sft_env['pre_data']}]", "sft.pack=true",
               f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: sft.pack: ") and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")


def test_resuming_with_sft_pack_changed_is_refused(sft_env, pre_run, tmp_path):
    from tests.parallel.conftest import logs
    run = train(str(tmp_path / "run"), SFT, *_args(sft_env, pre_run, "train.steps=2", "train.global_batch_size=4",
                                                   "train.eval_interval=0"))
    train(run, SFT, *_args(sft_env, pre_run, "train.steps=3", "train.global_batch_size=4", "sft.pack=true"),
          expect_ok=False)
    assert "sft.pack changed (False -> True)" in logs(run)
