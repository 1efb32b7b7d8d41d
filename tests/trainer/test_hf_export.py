"""Hugging Face export/import: transformers' own model classes must give our logits (fp32, max abs diff <= 1e-4)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmforge.export_hf import main as export_main
from llmforge.hf import import_hf, load_hf_into, save_hf  # noqa: E402
from llmforge.model.presets import PRESETS  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402

TOL = 1e-4


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


def _hf_logits(out: str, cls, tokens) -> torch.Tensor:
    model = cls.from_pretrained(out, attn_implementation="eager").eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_run_matches_transformers(family, llama_run, gpt2_run, tmp_path):
    run_dir = llama_run if family == "llama" else gpt2_run
    out = str(tmp_path / "hf")
    assert export_main([run_dir, out]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], "temp folder left behind"
    run = load_run(run_dir)
    toks = _tokens(run.model.args.vocab_size)
    with torch.no_grad():
        ours = run.model(toks)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    diff = (ours - _hf_logits(out, cls, toks)).abs().max().item()
    print(f"{family} export: max |logits ours - transformers| = {diff:.2e}")
    assert diff <= TOL

    cfg = json.load(open(os.path.join(out, "config.json")))
    if family == "llama":  # GQA and RoPE settings really made it into the config
        assert cfg["num_key_value_heads"] == run.model.args.n_kv_heads < run.model.args.n_heads
        assert cfg["rope_theta"] == run.model.args.rope_theta and cfg["rms_norm_eps"] == run.model.args.norm_eps
    # the converted tokenizer (when written) gives sentencepiece's ids
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        tok = transformers.AutoTokenizer.from_pretrained(out)
        text = "The model learns  from\tdata. Ünïcode 日本 42!"
        assert tok.encode(text, add_special_tokens=False) == run.tokenizer.encode(text)

    # import back: same args, same logits; load_hf_into fills a fresh model
    args, sd = import_hf(out)
    assert args == run.model.args
    fresh = Transformer(args).eval()
    load_hf_into(fresh, out)
    with torch.no_grad():
        back = fresh(toks)
    print(f"{family} import: max |logits| diff = {(back - ours).abs().max().item():.2e}")
    assert torch.equal(back, ours)

    # exporting again replaces the previous export in place
    assert export_main([run_dir, out, "--dtype", "bf16"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("tie", [True, False])
def test_llama_tied_and_untied_gqa(tie, tmp_path):
    """A random (not trained) Llama with GQA 4:1, non-default rope_theta/eps, tied or untied output."""
    args = dataclasses.replace(PRESETS["tiny"], vocab_size=97, n_heads=8, n_kv_heads=2, rope_theta=500000.0,
                               norm_eps=1e-6, tie_embeddings=tie, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    out = str(tmp_path / "hf")
    save_hf(args, model.state_dict(), out)
    toks = _tokens(args.vocab_size)
    with torch.no_grad():
        ours = model(toks)
    diff = (ours - _hf_logits(out, transformers.LlamaForCausalLM, toks)).abs().max().item()
    print(f"llama tie={tie}: max diff {diff:.2e}")
    assert diff <= TOL
    args2, sd = import_hf(out)
    assert args2 == args and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_import_refuses_what_the_model_cannot_run(tmp_path):
    args = dataclasses.replace(PRESETS["tiny"], vocab_size=50)
    out = str(tmp_path / "hf")
    save_hf(args, Transformer(args).state_dict(), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="llama3"):
        import_hf(out)
    other = Transformer(dataclasses.replace(args, n_layers=3))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="n_layers"):
        load_hf_into(other, out)
    with pytest.raises(ValueError, match="not a Hugging Face export"):  # never overwrite an unrelated folder
        os.makedirs(tmp_path / "precious")
        open(tmp_path / "precious" / "notes.txt", "w").close()
        save_hf(args, Transformer(args).state_dict(), str(tmp_path / "precious"))
