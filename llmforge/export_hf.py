"""Hugging Face interop: ``python -m llmforge.export_hf RUN_DIR OUT_DIR [--dtype fp32|bf16|fp16]`` and back.

Export writes ``model.safetensors``, ``config.json`` (LlamaForCausalLM or GPT2LMHeadModel), ``generation_config.json``
and the tokenizer: ``tokenizer.model`` (the run's sentencepiece model) plus, when transformers is installed and
its conversion reproduces sentencepiece's ids on a check text, ``tokenizer.json``/``tokenizer_config.json``.
Everything goes to a temp folder that is renamed into place, and only into a new or empty folder or one export_hf
wrote before (``.llmforge-export`` lists the files it wrote with a hash of each, the weights by size; a folder
holding anything else, or a file edited since, is refused). Import (``import_hf``, ``load_hf_into``) reads such
a folder (or a Llama/GPT-2 folder from the Hub, already downloaded) back into our parameter names.

Name mapping. Llama: our RoPE already uses HF's rotate-half layout, so q/k rows need no permutation; w1/w3/w2 are
gate/up/down. GPT-2: HF uses Conv1D (weight stored as (in, out), i.e. transposed) and one fused c_attn = [q; k; v].
Special tokens: training puts EOS (``</s>``) between documents and never BOS, so the export declares BOS = EOS (config,
generation config and tokenizer files) and its tokenizer adds no special token to a text: lm-eval's ``hf`` model
then scores a document after EOS with no extra flag, as the native adapter does (llmforge.lm_eval_adapter).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from llmforge.model.blocks import ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLAMA_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
               "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
GPT2_LAYER = {"attention_norm": "ln_1", "ffn_norm": "ln_2", "attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc",
              "feed_forward.w2": "mlp.c_proj"}  # + attn.c_attn (fused q, k, v); Linear weights transposed (Conv1D)
from llmforge.common.chat import CHECK_TEXT  # noqa: E402,F401  (re-exported)


SHAPE_KEYS = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings")


def shape_diff(want: ModelArgs, got: ModelArgs, keys=SHAPE_KEYS) -> list[str]:
    """``"key: want vs got"`` for each shape key where two model shapes differ (the one check of an HF import)."""
    return [f"{k}: model {getattr(want, k)} vs {getattr(got, k)}" for k in keys if getattr(want, k) != getattr(got, k)]


def llama_names(args: ModelArgs) -> dict[str, str]:
    """Our Llama parameter names -> HF's (the tied output weight maps to the embedding, as HF ties it)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"}
    for i in range(args.n_layers):
        for ours, hf in LLAMA_LAYER.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{hf}.weight"
    return names


# ------------------------------------------------------------------------------------------------ state dicts
def to_hf(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (tied output weight omitted, as HF stores it)."""
    out = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if args.family == "llama":
            for ours, hf in LLAMA_LAYER.items():
                out[f"model.layers.{i}.{hf}.weight"] = sd[p + ours + ".weight"]
            continue
        h = f"transformer.h.{i}."
        qkv = [p + f"attention.{w}" for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for ours, hf in GPT2_LAYER.items():
            w = sd[p + ours + ".weight"]
            out[h + hf + ".weight"] = w.t() if w.dim() == 2 else w
            out[h + hf + ".bias"] = sd[p + ours + ".bias"]
    if args.family == "llama":
        out["model.embed_tokens.weight"] = sd["tok_embeddings.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    else:
        out["transformer.wte.weight"] = sd["tok_embeddings.weight"]
        out["transformer.wpe.weight"] = sd["pos_embeddings.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names (the inverse of ``to_hf``; accepts GPT-2 files without the transformer. prefix)."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if args.family == "llama":
            for ours, name in LLAMA_LAYER.items():
                sd[p + ours + ".weight"] = hf[f"model.layers.{i}.{name}.weight"]
            continue
        h = f"h.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].t().split(args.dim)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].split(args.dim)
        for w, (wt, b) in zip(("wq", "wk", "wv"), ((q, qb), (k, kb), (v, vb))):
            sd[p + f"attention.{w}.weight"], sd[p + f"attention.{w}.bias"] = wt, b
        for ours, name in GPT2_LAYER.items():
            w = hf[h + name + ".weight"]
            sd[p + ours + ".weight"] = w.t() if w.dim() == 2 else w
            sd[p + ours + ".bias"] = hf[h + name + ".bias"]
    if args.family == "llama":
        sd["tok_embeddings.weight"], sd["norm.weight"] = hf["model.embed_tokens.weight"], hf["model.norm.weight"]
    else:
        sd["tok_embeddings.weight"], sd["pos_embeddings.weight"] = hf["wte.weight"], hf["wpe.weight"]
        sd["norm.weight"], sd["norm.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
    sd["output.weight"] = sd["tok_embeddings.weight"] if args.tie_embeddings else hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ configs
def hf_config(args: ModelArgs, special: dict, dtype: str = "float32") -> dict:
    if args.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": args.vocab_size,
                "n_positions": args.max_seq_len, "n_embd": args.dim, "n_layer": args.n_layers, "n_head": args.n_heads,
                "n_inner": args.ffn_dim, "activation_function": "gelu_new", "layer_norm_epsilon": args.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": args.tie_embeddings,
                "dtype": dtype, "torch_dtype": dtype, **special}
    # rope_theta at top level (transformers 4) and in rope_parameters (transformers 5)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}, "rms_norm_eps": args.norm_eps,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": args.tie_embeddings, "dtype": dtype, "torch_dtype": dtype, **special}


def args_from_hf_config(c: dict) -> ModelArgs:
    """ModelArgs for a Llama/GPT-2 config.json; refuses features our model does not implement."""
    kind = c.get("model_type")
    if kind == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json: GPT-2 activation {c['activation_function']!r} is not supported (gelu_new)")
        return ModelArgs(family="gpt2", dim=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
                         n_kv_heads=c["n_head"], ffn_dim=c.get("n_inner") or 4 * c["n_embd"], vocab_size=c["vocab_size"],
                         max_seq_len=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=c.get("tie_word_embeddings", True))
    if kind != "llama":
        raise ValueError(f"config.json: model_type {kind!r} is not supported (llama, gpt2)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented "
                         "by llmforge's model; logits would differ")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (llmforge Llama uses {want!r})")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ValueError(f"config.json: head_dim={c['head_dim']} != hidden_size / num_attention_heads")
    return ModelArgs(family="llama", dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
                     n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
                     vocab_size=c["vocab_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                     norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False))


# ------------------------------------------------------------------------------------------------ export
EXPORT_MARKER = ".llmforge-export"  # {"written_by": "llmforge.export_hf", "files": [what the export wrote]}


def check_export_dir(out_dir: str) -> None:
    """Write only into a new or empty folder, or an earlier export nobody added to: a folder holding a config.json
    beside the user's README and subfolders (a downloaded model, a model card being written) is never replaced."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder: refusing to overwrite it")
    names = sorted(os.listdir(out_dir))
    try:
        with open(os.path.join(out_dir, EXPORT_MARKER)) as f:
            marker = json.load(f)
        ours = set(marker["files"]) | {EXPORT_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        marker, ours = {}, set()
    others = [n for n in names if n not in ours]
    edited = [] if others else [n for n in _edited(out_dir, marker) if n in names]
    if not others and not edited:
        return
    shown = ", ".join((others or edited)[:4]) + (", ..." if len(others or edited) > 4 else "")
    what = ("an earlier export whose files were edited since:" if edited else
            "an earlier export that now also holds" if ours else
            "not a Hugging Face export written by export_hf: it holds")
    raise ValueError(f"{out_dir} is {what} {shown}: refusing to overwrite it (choose a new or empty folder)")


def _file_id(path: str) -> str:
    """What the marker records per file: the weights by size (GBs, never hand-edited), the rest by content (a
    config.json or generation_config.json the user tuned by hand must not be replaced by the next export)."""
    if path.endswith(".safetensors"):
        return f"size {os.path.getsize(path)}"
    import xxhash
    with open(path, "rb") as f:
        return xxhash.xxh3_64_hexdigest(f.read())


def _edited(out_dir: str, marker: dict) -> list[str]:
    ids = marker.get("ids") if isinstance(marker, dict) else None
    if not isinstance(ids, dict):
        return []  # an export from before the ids were recorded: its names alone are checked
    return sorted(n for n, v in ids.items() if os.path.isfile(os.path.join(out_dir, n))
                  and _file_id(os.path.join(out_dir, n)) != v)


def _save_tokenizer(tok_path: str, out: str) -> str:
    """Copy tokenizer.model; add transformers' tokenizer files when the conversion reproduces sentencepiece."""
    shutil.copyfile(tok_path, os.path.join(out, "tokenizer.model"))
    try:
        import sentencepiece as spm
        from transformers import AutoTokenizer
    except ImportError:
        return "tokenizer.model only (transformers not installed)"
    conv = os.path.join(out, ".tokenizer-conversion")
    os.makedirs(conv)
    shutil.copyfile(tok_path, os.path.join(conv, "tokenizer.model"))  # alone: no config.json steers the class
    try:
        hf_tok = AutoTokenizer.from_pretrained(conv)
        same = hf_tok.encode(CHECK_TEXT, add_special_tokens=False) == spm.SentencePieceProcessor(
            model_file=tok_path).encode(CHECK_TEXT)
        if same:
            hf_tok.bos_token = hf_tok.eos_token  # BOS = EOS, as in config.json (see save_hf)
            for attr in ("add_bos_token", "add_eos_token"):  # encode() adds nothing: exactly sentencepiece's ids
                if hasattr(hf_tok, attr):
                    setattr(hf_tok, attr, False)
            hf_tok.save_pretrained(out)
    except Exception as e:  # conversion support varies across transformers versions
        return f"tokenizer.model only (transformers could not convert it: {type(e).__name__})"
    finally:
        shutil.rmtree(conv, ignore_errors=True)
    return "tokenizer.model + tokenizer.json" if same else "tokenizer.model only (converted ids differ from sentencepiece)"


def save_hf(args: ModelArgs, state_dict: dict, out_dir: str, tok_path: str | None = None, dtype: str = "fp32",
            run_dir: str | None = None) -> str:
    """Write an HF folder atomically (temp folder + rename). Returns a note on the tokenizer files. A fine-tuned
    ``run_dir`` (chat_template.json) also gets its chat template into the tokenizer config (llmforge.common.chat)."""
    from safetensors.torch import save_file
    out_dir = os.path.realpath(out_dir)  # a link to an export: write its target (a renamed link was left behind)
    check_export_dir(out_dir)
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok_path:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=tok_path)
        # Training separates documents with EOS and never sees BOS, so the export declares BOS = EOS: tools that put
        # BOS before a document (lm-eval's rolling log-likelihood, an empty prompt) then put EOS there, as training did
        eos = sp.eos_id()
        ids = {"bos_token_id": eos if eos >= 0 else sp.bos_id(), "eos_token_id": eos, "pad_token_id": sp.pad_id()}
        special = {k: (v if v >= 0 else None) for k, v in ids.items()}
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf(args, state_dict).items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(args, special, torch_dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({**special, "do_sample": True, "temperature": 0.8}, f, indent=2)
        note = _save_tokenizer(tok_path, tmp) if tok_path else "no tokenizer (the run had none)"
        if tok_path and run_dir:
            from llmforge.export_chat import write_hf_chat_template
            note = "; ".join(n for n in (note, write_hf_chat_template(tmp, run_dir, tok_path)) if n)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:  # last: the folder is renamed into place after it
            names = sorted(os.listdir(tmp))
            json.dump({"written_by": "llmforge.export_hf", "files": names,
                       "ids": {n: _file_id(os.path.join(tmp, n)) for n in names if n != EXPORT_MARKER}}, f, indent=1)
        old = f"{out_dir}.old{os.getpid()}"
        if os.path.exists(out_dir):
            os.rename(out_dir, old)  # a previous export: swapped out, then removed
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return note
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(run_dir: str, out_dir: str, dtype: str = "fp32", overrides=None) -> tuple[str, str]:
    from llmforge.run_loading import load_run
    check_export_dir(out_dir)  # before loading the run: a refusal costs nothing
    run = load_run(run_dir, overrides, log=lambda m: print(m, file=sys.stderr))
    tok = os.path.join(run_dir, "tokenizer.model")
    note = save_hf(run.model.args, run.model.state_dict(), out_dir, tok if os.path.isfile(tok) else None, dtype,
                   run_dir)
    return run.checkpoint, note


# ------------------------------------------------------------------------------------------------ import
def hf_model_args(hf_dir: str) -> ModelArgs:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        return args_from_hf_config(json.load(f))


def _read_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded checkpoint
        files = sorted(set(json.load(open(index))["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}
    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        return load_file(os.path.join(hf_dir, "model.safetensors"))
    if os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        from llmforge.safe_pickle import safe_torch_load  # tensors only: a crafted .bin is refused in one line
        return safe_torch_load(os.path.join(hf_dir, "pytorch_model.bin"))
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin")


def import_hf(hf_dir: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, state dict in our names, fp32) from a Llama/GPT-2 Hugging Face folder."""
    args = hf_model_args(hf_dir)
    try:
        sd = from_hf(args, _read_weights(hf_dir))
    except KeyError as e:
        raise ValueError(f"{hf_dir}: weight {e} missing for a {args.family} model of {args.n_layers} layers") from None
    return args, {k: v.float() for k, v in sd.items()}


def load_hf_into(model, hf_dir: str) -> ModelArgs:
    """Copy an HF folder's weights into our (unparallelised) model; its shape must match the folder's config."""
    args, sd = import_hf(hf_dir)
    keys = ["family", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "norm_eps", "tie_embeddings"]
    keys += ["rope_theta"] if args.family == "llama" else ["max_seq_len"]
    diff = [f"{k}: model {getattr(model.args, k)} vs {getattr(args, k)}" for k in keys
            if getattr(model.args, k) != getattr(args, k)]
    if diff:
        raise ValueError(f"train.init_from_hf={hf_dir} does not match the model ({'; '.join(diff)})")
    model.load_state_dict(sd, strict=True)
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmforge.export_hf", description="Export a run's newest checkpoint "
                                "as a Hugging Face model folder (LlamaForCausalLM / GPT2LMHeadModel).")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (rarely needed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype in model.safetensors")
    a = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from llmforge.run_loading import run_cli

    def body() -> int:
        ckpt, note = export_run(a.run_dir, a.out_dir, a.dtype, a.overrides)
        print(f"exported {ckpt} -> {os.path.abspath(a.out_dir)} ({note})")
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
