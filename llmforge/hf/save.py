"""Writing a Hugging Face model folder: ``model.safetensors``, ``config.json`` (LlamaForCausalLM, Qwen3ForCausalLM,
Qwen3MoeForCausalLM or GPT2LMHeadModel), ``generation_config.json`` and the tokenizer: ``tokenizer.model`` (the
run's sentencepiece model) plus, when transformers is installed and its conversion reproduces sentencepiece's ids on
a check text, ``tokenizer.json``/``tokenizer_config.json``. Everything goes to a temp folder that is renamed into
place, and only into a new or empty folder or one export_hf wrote before (``.llmforge-export`` lists the files it
wrote with a hash of each, the weights by size; a folder holding anything else, or a file edited since, is refused).

Special tokens: training puts EOS (``</s>``) between documents and never BOS, so the export declares BOS = EOS
(config, generation config and tokenizer files) and its tokenizer adds no special token to a text: lm-eval's
``hf`` model then scores a document after EOS with no extra flag, as the native adapter does
(llmforge.inference.lm_eval_adapter).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from llmforge.common.chat import CHECK_TEXT
from llmforge.model.blocks import ModelArgs

from .adapter import hf_config, to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
            from .chat import write_hf_chat_template
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
