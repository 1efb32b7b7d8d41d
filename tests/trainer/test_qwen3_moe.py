"""Qwen3-MoE interop (llmforge/hf/qwen3_moe.py): a transformers Qwen3MoeForCausalLM folder imports with its logits
and loss and starts a run (train.init_from_hf) whose first loss is transformers'; an MoE run exports as
Qwen3MoeForCausalLM (one tensor per expert, as save_pretrained writes) with our logits; dense and MoE folders and
configs that disagree are refused naming the key."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from llmforge.export_hf import main as export_main  # noqa: E402
from llmforge.hf import import_hf, load_hf_into  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402
from tests.conftest import read_metrics  # noqa: E402
from tests.trainer.conftest import train_run  # noqa: E402

# tiny-moe reshaped as Qwen3-MoE: dim 64, 2 layers, 4 heads of 16, 2 kv heads, 4 experts of width 32, top-2
MOE = ["model.preset=tiny-moe", "model.qk_norm=true", "model.head_dim=16", "model.moe.num_experts=4",
       "model.moe.ffn_dim=32", "model.moe.top_k=2"]


def _tokens(vocab: int, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def _hf_moe(folder: str, vocab: int = 128, **kw) -> transformers.PreTrainedModel:
    """A random tiny Qwen3MoeForCausalLM saved with save_pretrained (weights not at their init values)."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True, max_position_embeddings=128, rope_theta=1e6,
                                      tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)  # the norms and the router must be read, not left at their init
    hf.save_pretrained(folder)
    return hf


def _loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_dir) -> str:
    return train_run(str(tmp_path_factory.mktemp("qwen3moe") / "run"), data_dir, *MOE, "train.steps=3")


def test_a_transformers_qwen3_moe_imports_with_its_logits_and_loss(tmp_path):
    folder = str(tmp_path / "hf")
    hf = _hf_moe(folder, mlp_only_layers=[0])  # a mixed model: block 0 dense, block 1 MoE
    args, sd = import_hf(folder)
    m = args.moe
    assert (m.num_experts, m.top_k, m.ffn_dim, m.norm_topk, m.dense_layers) == (4, 2, 32, True, 1)
    assert sd["layers.1.moe.experts.w1"].shape == (4, 32, 64) and sd["layers.1.moe.experts.w2"].shape == (4, 64, 32)
    ours = Transformer(args)
    ours.load_state_dict(sd)
    assert ours.layers["0"].moe is None and ours.layers["1"].feed_forward is None
    x = _tokens(128)
    with torch.no_grad():
        want = hf(x, labels=x)
        got = ours.eval()(x)
    assert float((want.logits - got).abs().max()) <= 1e-4
    ours.train()  # the training forward (aux loss only in backward): the same step-0 loss
    loss = _loss(ours(x), x)
    assert abs(loss.item() - float(want.loss)) <= 1e-5, (loss.item(), float(want.loss))
    loss.backward()  # the aux-loss path runs


def test_an_moe_run_exports_as_qwen3_moe_with_our_logits(moe_run, tmp_path):
    run = load_run(moe_run)
    out = str(tmp_path / "hf")
    assert export_main([moe_run, out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["moe_intermediate_size"] == 32 and cfg["mlp_only_layers"] == [] and cfg["norm_topk_prob"] is True
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.3.down_proj.weight"} <= keys
    assert not any("gate_up_proj" in k or k.endswith("mlp.gate_proj.weight") for k in keys)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    x = _tokens(run.model.args.vocab_size)
    with torch.no_grad():
        diff = float((hf(x).logits - run.model(x)).abs().max())
    assert diff <= 1e-4, diff
    # transformers writes back the same names (what the Hub stores) and we read its folder
    again = str(tmp_path / "again")
    hf.save_pretrained(again)
    with safe_open(os.path.join(again, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys
    _, sd = import_hf(again)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in sd.items())


def test_export_refuses_what_qwen3_moe_cannot_express(tmp_path):
    from llmforge.hf import save_hf
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.moe import MoEArgs
    for moe, key in ((MoEArgs(num_experts=4, shared_experts=1), "model.moe.shared_experts"),
                     (MoEArgs(num_experts=4, balance="bias"), "model.moe.balance")):
        args = ModelArgs(vocab_size=64, qk_norm=True, moe=moe)
        model = Transformer(args)
        with pytest.raises(ValueError, match=key):
            save_hf(args, model.state_dict(), str(tmp_path / key))
        assert not os.path.exists(tmp_path / key)


def test_dense_and_moe_shapes_never_mix(tmp_path, data_dir, capsys):
    from llmforge.train import main
    dense = str(tmp_path / "dense")
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(dense)
    moe_folder = str(tmp_path / "moe")
    _hf_moe(moe_folder, vocab=300)
    dense_args, _ = import_hf(dense)
    moe_args, _ = import_hf(moe_folder)
    with pytest.raises(ValueError, match=r"moe\.num_experts: model 4 vs 0"):
        load_hf_into(Transformer(moe_args), dense)  # the library check (check_hf_shape)
    with pytest.raises(ValueError, match=r"moe\.num_experts: model 0 vs 4"):
        load_hf_into(Transformer(dense_args), moe_folder)
    capsys.readouterr()  # save_pretrained's progress bars
    rc = main(["configs/train/tiny-cpu.yaml", f"data.paths=[{data_dir}]", f"run_dir={tmp_path / 'run'}",
               f"train.init_from_hf={dense}", "train.steps=1", *MOE])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "model.moe.num_experts=4" in err[0] and "dense" in err[0], err


def test_a_run_from_a_qwen3_moe_folder_starts_at_transformers_loss(tmp_path, data_dir):
    from llmforge.core.config import RunConfig, load_config
    from llmforge.data.streams import build_datasets
    folder = str(tmp_path / "hf")
    hf = _hf_moe(folder, vocab=300)
    run = train_run(str(tmp_path / "run"), data_dir, f"train.init_from_hf={folder}", "train.steps=1")
    cfg = load_config(RunConfig, os.path.join(run, "config.yaml"))
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.ffn_dim == 32  # config.yaml rebuilds the MoE shape
    stream, _ = build_datasets(cfg.data, cfg.seed)
    batch = stream.batch(0, cfg.train.global_batch_size).long()
    with torch.no_grad():
        want = float(hf(batch, labels=batch).loss)
    got = read_metrics(run)[1]["loss"]
    assert abs(got - want) <= 1e-5 * want, (got, want)
    assert load_run(run).model.args.moe.num_experts == 4


def test_shards_read_only_their_experts_and_rows(tmp_path, data_dir):
    from llmforge.hf import LlamaSafetensorsReader
    from tests.conftest import run_cli, train_cmd
    folder = str(tmp_path / "hf")
    hf = _hf_moe(folder, vocab=300)
    args, sd = import_hf(folder)
    reader = LlamaSafetensorsReader(folder, args)
    experts, rows = torch.tensor([1, 3]), torch.tensor([2, 5, 7])
    assert torch.equal(reader.read("layers.0.moe.experts.w1", {0: experts, 1: rows}),
                       sd["layers.0.moe.experts.w1"][experts][:, rows])
    assert torch.equal(reader.read("layers.0.moe.experts.w2", {1: rows}), sd["layers.0.moe.experts.w2"][:, rows])
    # two FSDP ranks (zero_stage 3): each holds half of the experts of every stacked weight (dim 0)
    run = str(tmp_path / "run")
    p = run_cli(train_cmd(2) + ["configs/train/tiny-cpu.yaml", f"data.paths=[{data_dir}]", f"run_dir={run}",
                                f"train.init_from_hf={folder}", "train.steps=0", "parallel.dp_shard=2",
                                "parallel.zero_stage=3", "data.seq_len=32", "train.global_batch_size=4",
                                "train.eval_interval=0", "checkpoint.interval=0", "logging.plot=false"])
    assert p.returncode == 0, p.stderr[-2000:]
    x = _tokens(300)
    with torch.no_grad():
        assert float((hf(x).logits - load_run(run).model(x)).abs().max()) <= 1e-4


def test_expert_parallel_shards_import_their_experts(tmp_path, data_dir):
    """Under ep2 (dp_shard 2) each rank holds two of the four experts as an EP DTensor: the imported model is
    transformers' one (logits within 1e-4 after a step-0 checkpoint)."""
    from tests.conftest import run_cli, train_cmd
    folder = str(tmp_path / "hf")
    hf = _hf_moe(folder, vocab=300)
    run = str(tmp_path / "run")
    p = run_cli(train_cmd(2) + ["configs/train/tiny-cpu.yaml", f"data.paths=[{data_dir}]", f"run_dir={run}",
                                f"train.init_from_hf={folder}", "train.steps=0", "parallel.dp_shard=2",
                                "parallel.zero_stage=3", "parallel.ep=2", "data.seq_len=32",
                                "train.global_batch_size=4", "train.eval_interval=0", "checkpoint.interval=0",
                                "logging.plot=false"])
    assert p.returncode == 0, p.stderr[-2000:]
    x = _tokens(300)
    with torch.no_grad():
        assert float((hf(x).logits - load_run(run).model(x)).abs().max()) <= 1e-4
