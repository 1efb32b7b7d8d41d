"""Qwen3 dense attention in the Llama family (model.qk_norm: an RMSNorm per query and key head; model.head_dim
other than dim / n_heads): trained runs export as Qwen3ForCausalLM with transformers' logits, a transformers
Qwen3 folder imports with its logits and starts a run (train.init_from_hf) at its weights, and TP refuses it."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmforge.export_hf import main as export_main  # noqa: E402
from llmforge.hf import import_hf  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402
from tests.trainer.conftest import train_run  # noqa: E402

QWEN3 = ["model.qk_norm=true", "model.head_dim=32"]  # tiny: dim 64, 4 heads -> 4 x 32 = 128 query width


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory, data_dir) -> str:
    return train_run(str(tmp_path_factory.mktemp("qwen3") / "run"), data_dir, *QWEN3)


def test_a_trained_qwen3_run_exports_with_transformers_logits(qwen3_run, tmp_path):
    run = load_run(qwen3_run)
    a = run.model.args
    assert a.qk_norm and a.head_dim == 32 and run.model.layers["0"].attention.wq.out_features == 128
    out = str(tmp_path / "hf")
    assert export_main([qwen3_run, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.head_dim == 32
    x = _tokens(a.vocab_size)
    with torch.no_grad():
        diff = float((hf(x).logits - run.model(x)).abs().max())
    assert diff <= 1e-4, diff


def test_a_transformers_qwen3_imports_and_starts_a_run_at_its_weights(data_dir, tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    for p in hf.parameters():
        p.data.normal_(0.0, 0.05)  # not the init values: the norms must be read, not left at ones
    folder = str(tmp_path / "qwen3")
    hf.save_pretrained(folder)
    args, sd = import_hf(folder)
    assert args.qk_norm and args.head_dim == 32 and args.family == "llama"
    ours = Transformer(args)
    ours.load_state_dict(sd)
    x = _tokens(300)
    with torch.no_grad():
        want = hf(x).logits
        assert float((want - ours(x)).abs().max()) <= 1e-4
    run = train_run(str(tmp_path / "from_hf"), data_dir, f"train.init_from_hf={folder}", "train.steps=0")
    with torch.no_grad():
        got = load_run(run).model(x)
    assert float((want - got).abs().max()) <= 1e-4
    assert os.path.isfile(os.path.join(run, "config.yaml"))


def test_qk_norm_with_tensor_parallel_is_refused_in_one_line(data_dir, tmp_path, capsys):
    from llmforge.train import main
    os.environ.update(WORLD_SIZE="2")
    try:
        rc = main(["configs/train/tiny-cpu.yaml", f"data.paths=[{data_dir}]", f"run_dir={tmp_path / 'tp'}",
                   "parallel.tp=2", *QWEN3])
    finally:
        del os.environ["WORLD_SIZE"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: model.qk_norm with parallel.tp>1"), err
