"""RoPE scaling for context extension (model.rope_scaling, type none | llama3 | yarn): transformers' LlamaForCausalLM
with the same rope_scaling gives our logits (fp32, <= 1e-4) at positions past original_max_seq_len, both ways
(import a transformers folder, export ours); missing parameters and gpt2 are one-line errors; type none leaves the
RoPE tables bit-identical."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmforge.core.config import ConfigError, RunConfig, load_config  # noqa: E402
from llmforge.hf import import_hf  # noqa: E402
from llmforge.hf.save import save_hf  # noqa: E402
from llmforge.model.blocks import ModelArgs, RopeScaling, model_rope_tables, rope_tables  # noqa: E402
from llmforge.model.presets import model_args  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402

ORIGINAL = 64  # the "pretraining" context of the tiny models; inputs are 200 tokens
HF_SCALING = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0,
             "beta_slow": 1.0},
}
OURS = {"llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_seq_len=ORIGINAL),
        "yarn": RopeScaling("yarn", factor=4.0, original_max_seq_len=ORIGINAL, beta_fast=32.0, beta_slow=1.0)}


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))


def _hf_model(kind: str):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_parameters={**HF_SCALING[kind], "rope_theta": 10000.0},
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_a_transformers_folder_with_rope_scaling_imports_with_its_logits(kind, tmp_path):
    hf = _hf_model(kind)
    folder = str(tmp_path / kind)
    hf.save_pretrained(folder)
    args, sd = import_hf(folder)
    assert args.rope_scaling == OURS[kind] and args.max_seq_len == 256
    ours = Transformer(args).eval()
    ours.load_state_dict(sd)
    x = _tokens()
    with torch.no_grad():
        want, got = hf(x).logits, ours(x)
    assert float((want - got).abs().max()) <= 1e-4
    # the scaling matters past the original context: plain RoPE gives other logits there
    plain = Transformer(dataclasses.replace(args, rope_scaling=RopeScaling())).eval()
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert float((plain(x) - want)[:, ORIGINAL:].abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_an_export_with_rope_scaling_loads_in_transformers_with_our_logits_and_round_trips(kind, tmp_path):
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                     max_seq_len=256, rope_scaling=OURS[kind])
    torch.manual_seed(0)
    ours = Transformer(args).eval()
    out = str(tmp_path / "hf")
    save_hf(args, ours.state_dict(), out)
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    want = {**HF_SCALING[kind], "rope_theta": 10000.0}
    assert c["rope_parameters"] == want, c["rope_parameters"]  # transformers 5 reads rope_parameters
    assert c["rope_scaling"] == HF_SCALING[kind]  # transformers 4 reads rope_scaling
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert {k: hf.config.rope_parameters[k] for k in want} == want
    x = _tokens()
    with torch.no_grad():
        assert float((hf(x).logits - ours(x)).abs().max()) <= 1e-4
    back, _ = import_hf(out)
    assert back == args  # rope_scaling included


def test_model_rope_scaling_keys_resolve_to_model_args():
    cfg = load_config(RunConfig, None, ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
                                        "model.rope_scaling.low_freq_factor=1",
                                        "model.rope_scaling.high_freq_factor=4",
                                        f"model.rope_scaling.original_max_seq_len={ORIGINAL}"])
    cfg.validate()
    assert model_args(cfg.model, 128).rope_scaling == OURS["llama3"]
    assert model_args(RunConfig().model, 128).rope_scaling == RopeScaling()


@pytest.mark.parametrize("overrides, key", [
    (["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=1", "model.rope_scaling.high_freq_factor=4",
      "model.rope_scaling.original_max_seq_len=8192"], "model.rope_scaling.factor"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"], "model.rope_scaling.original_max_seq_len"),
    (["model.rope_scaling.type=ntk"], "model.rope_scaling.type"),
    (["model.rope_scaling.factor=8"], "model.rope_scaling.factor"),  # set, but type none
])
def test_rope_scaling_with_missing_parameters_is_one_config_error_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, overrides)  # validates
    msg = str(e.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


def test_model_args_refuses_missing_parameters_and_gpt2():
    cfg = RunConfig().model
    bad = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling, type="yarn", factor=4.0))
    with pytest.raises(ValueError, match=r"^model\.rope_scaling\.original_max_seq_len: required"):
        model_args(bad, 128)
    scaled = dataclasses.replace(cfg, preset="tiny-gpt2", rope_scaling=dataclasses.replace(
        cfg.rope_scaling, type="yarn", factor=4.0, original_max_seq_len=64))
    with pytest.raises(ValueError, match="model.family=llama"):
        model_args(scaled, 128)


def test_the_trainer_cli_refuses_missing_parameters_in_one_line(tmp_path, capsys):
    from llmforge.train import main
    rc = main(["configs/train/tiny-cpu.yaml", f"run_dir={tmp_path / 'r'}", "model.rope_scaling.type=llama3",
               "model.rope_scaling.original_max_seq_len=64"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "model.rope_scaling.factor" in err[0], err


def test_type_none_keeps_the_rope_tables_bit_identical():
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                     max_seq_len=512, rope_theta=500000.0)
    want = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    got = model_rope_tables(args)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    model = Transformer(args)
    assert torch.equal(model.rope_cos, want[0]) and torch.equal(model.rope_sin, want[1])
    # and the reference formula of before (no scaling argument at all)
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    emb = torch.outer(torch.arange(512, dtype=torch.float32), inv)
    assert torch.equal(want[0], torch.cat([emb, emb], -1).cos())
    # llama3 below original: high-frequency dimensions unchanged; yarn scales cos/sin by 0.1 ln(4) + 1
    cos, _ = rope_tables(16, 512, 10000.0, scaling=OURS["yarn"])
    assert abs(float(cos[0, 0]) - (0.1 * torch.log(torch.tensor(4.0)).item() + 1)) < 1e-6


def test_a_context_extension_start_keeps_the_weights_and_takes_the_runs_scaling(tmp_path):
    from llmforge.train.run_plan import resolve_model_args, resolved_config
    hf = _hf_model("llama3")
    hf.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    hf.config.max_position_embeddings = ORIGINAL
    folder = str(tmp_path / "plain")
    hf.save_pretrained(folder)
    cfg = load_config(RunConfig, None, [f"train.init_from={folder}", "model.max_seq_len=512",
                                        "model.rope_scaling.type=yarn", "model.rope_scaling.factor=8",
                                        f"model.rope_scaling.original_max_seq_len={ORIGINAL}"])
    cfg.validate()
    margs = resolve_model_args(cfg, None)
    assert margs.max_seq_len == 512 and margs.rope_scaling.type == "yarn" and margs.rope_scaling.factor == 8
    recorded = resolved_config(cfg, margs).model
    rebuilt = model_args(recorded, margs.vocab_size)  # config.yaml's model section rebuilds the extension
    assert (rebuilt.rope_scaling, rebuilt.max_seq_len, rebuilt.head_dim) == (margs.rope_scaling, 512, 16)


def test_a_trained_run_with_rope_scaling_exports_with_transformers_logits(data_dir, tmp_path):
    from llmforge.export_hf import main as export_main
    from llmforge.inference.run_loading import load_run
    from tests.trainer.conftest import train_run
    run_dir = train_run(str(tmp_path / "run"), data_dir, "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                        f"model.rope_scaling.original_max_seq_len={ORIGINAL}")
    run = load_run(run_dir)
    assert run.model.args.rope_scaling == RopeScaling("yarn", factor=4.0, original_max_seq_len=ORIGINAL)
    out = str(tmp_path / "hf")
    assert export_main([run_dir, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    x = torch.randint(0, run.model.args.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((hf(x).logits - run.model(x)).abs().max()) <= 1e-4


def test_a_meta_built_model_recomputes_the_scaled_tables():
    from llmforge.parallel.build import init_buffers
    args = ModelArgs(family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                     max_seq_len=256, rope_scaling=OURS["llama3"])
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    init_buffers(model, "cpu")
    want = model_rope_tables(args)
    assert torch.equal(model.rope_cos, want[0]) and torch.equal(model.rope_sin, want[1])
    assert not torch.equal(want[0], rope_tables(args.head_dim, 256, args.rope_theta)[0])
