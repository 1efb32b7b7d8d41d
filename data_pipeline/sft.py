"""Supervised fine-tuning (SFT) data: chat rows -> chat-template token shards + a per-token loss mask.

Enabled by ``sft.enabled: true`` (preset ``configs/data/sft.yaml``). Rows are ``{"prompt", "response"}`` (an
optional ``"system"``) or ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
A malformed row (missing field, both prompt/response and messages, unknown role, empty response, last message not
the assistant's, more characters in its messages than ``input.max_doc_chars``, longer than ``sft.max_tokens``
after ``sft.truncation``) is reported as ``file:line: ...`` and fails the run or is counted
under ``read_errors`` per ``input.on_error``, exactly like the pretraining reader.

The chat template (``llmforge.common.chat``; written to ``OUT/chat_template.json`` with an equivalent Jinja string so
training, eval, generate and the Hugging Face export all use one definition)::

    </s><|system|>\\n{system}\\n<|user|>\\n{prompt}\\n<|assistant|>\\n{response}</s><|user|>\\n...

Every conversation starts with EOS (the document separator of pretraining, where the model has learnt that
documents begin) and each assistant turn ends with EOS (generation stops there). Text between two EOS tokens is
encoded as one piece of text *without* sentencepiece's dummy-prefix space: that is exactly how a Hugging Face
tokenizer encodes text that follows a special token, so ``apply_chat_template`` reproduces our ids.

Loss mask: 1 on the tokens of assistant contents and on the EOS that ends them, 0 elsewhere (template, system,
user). Found from sentencepiece's byte offsets, so a token is a response token when it starts in (or overlaps)
the response. Outputs beside the usual ones: ``loss_mask/<shard name>.bin/.idx`` (Megatron MMIDIDX, uint8, the
same document lengths as ``shards/<shard name>``) and ``chat_template.json``. The token shards themselves are
plain Megatron shards (one conversation per document).

Cleaning in SFT mode is per message and keeps inner whitespace (code indentation matters in responses):
Unicode normalisation (``clean.normalization``), control characters removed, CRLF -> LF, outer whitespace
stripped. Exact dedup hashes the rendered conversation; the quality filters see the rendered text when listed
in ``steps`` (the preset lists none).
"""
from __future__ import annotations

import functools
import glob
import os

import numpy as np

from .atomic_io import read_json, write_bytes, write_json
from .executor import PipelineError
from .shards import IndexedShard, ShardWriter, token_dtype
from .sft_rows import encode_row

from llmforge.common.chat import (JINJA, MASK_DIR, ROLES, TEMPLATE_FILE, TEMPLATE_NAME, ChatTemplate,  # noqa: F401
                                  ChatTemplateError, header, load_template, render)
from .work_dirs import mask_prefix

# ------------------------------------------------------------------------------------------------ stages
def tokenizer_task(ctx, rank: int) -> dict:
    """Copy the given tokenizer (SFT never trains one) and write chat_template.json beside it."""
    from .tokenizer import model_path, train_tokenizer_task
    if not ctx.cfg.tokenizer.model_path:
        raise PipelineError("sft.enabled needs tokenizer.model_path (the pretraining tokenizer)")
    stats = train_tokenizer_task(ctx, rank)
    write_json(os.path.join(ctx.out, TEMPLATE_FILE), ChatTemplate(model_path(ctx)).describe())
    return stats


def tokenize_task(ctx, rank: int) -> dict:
    """Like the pretraining tokenize stage, one conversation per document, plus the per-task loss-mask shards."""
    from .tokenizer import is_valid, kept_docs, model_path, task_shard_prefix
    cfg = ctx.cfg
    template = ChatTemplate(model_path(ctx))
    dtype = token_dtype(template.sp.vocab_size())
    writers = {s: ShardWriter(task_shard_prefix(ctx.work, s, rank), dtype) for s in ("train", "valid")}
    masks = {s: ShardWriter(mask_prefix(ctx.work, s, rank), np.uint8) for s in writers}
    ids_out = {s: [] for s in writers}
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "loss_tokens": 0} for s in writers}
    try:
        for doc in kept_docs(ctx, rank):
            split = "valid" if is_valid(doc["id"], cfg) else "train"
            ids, mask = encode_row(template, doc["meta"]["messages"], cfg.sft)
            writers[split].add_document(np.asarray(ids, dtype=dtype))
            masks[split].add_document(np.asarray(mask, dtype=np.uint8))
            ids_out[split].append(doc["id"])
            st = stats[split]
            st["docs"] += 1
            st["tokens"] += len(ids)
            st["loss_tokens"] += int(sum(mask))
            st["bytes"] += len(doc["text"].encode("utf-8"))
        for s in writers:
            write_bytes(task_shard_prefix(ctx.work, s, rank) + ".ids", "".join(i + "\n" for i in ids_out[s]).encode())
            masks[s].close()
            writers[s].close()
    except BaseException:
        for w in (*writers.values(), *masks.values()):
            w.abort()
        raise
    return stats


def loss_mask_task(ctx, _rank: int) -> dict:
    """``loss_mask/<name>`` for every final ``shards/<name>``: the per-task masks in the order shard_task wrote
    the documents (tasks in order), cut at the same document counts; built in a temp folder, renamed into place."""
    import shutil
    tmp = os.path.join(ctx.out, f"{MASK_DIR}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = {}
    for split in ("train", "valid"):
        finals = [p[:-4] for p in sorted(glob.glob(os.path.join(ctx.out, "shards", f"{split}-*.idx")))]
        sources = [IndexedShard(mask_prefix(ctx.work, split, t)) for t in range(ctx.n_tasks)]
        docs = ((src, i) for src in sources for i in range(len(src)))
        for final in finals:
            tokens = IndexedShard(final)
            with ShardWriter(os.path.join(tmp, os.path.basename(final)), np.uint8) as w:
                for j in range(len(tokens)):
                    src, i = next(docs)
                    if src.lengths[i] != tokens.lengths[j]:
                        raise PipelineError(f"loss mask of {final} document {j} has {src.lengths[i]} entries for "
                                            f"{tokens.lengths[j]} tokens")
                    w.add_document(src.doc(i))
        names[split] = [os.path.basename(f) for f in finals]
    from .manifest import install_dir
    install_dir(tmp, os.path.join(ctx.out, MASK_DIR))  # a user's file in loss_mask/ stays
    return {"loss_mask": names}


def finalize_task(base_finalize, ctx, rank: int) -> dict:
    """The pipeline's finalize (``base_finalize``, taken from the stage list: sft_stages), then stats.json gains an
    ``sft`` section (loss tokens per split, template)."""
    from .executor import stage_results
    out = base_finalize(ctx, rank)
    path = os.path.join(ctx.out, "stats.json")
    stats = read_json(path)
    tok = stage_results(ctx.work, "tokenize", ctx.n_tasks)
    stats["sft"] = {"template": TEMPLATE_NAME, "loss_tokens": {s: sum(t[s]["loss_tokens"] for t in tok)
                                                               for s in ("train", "valid")}}
    write_json(path, stats)
    return out


def sft_stages(stages: list) -> list:
    """The pretraining stage list with SFT's tokenizer/tokenize/finalize tasks and a loss_mask stage after shard."""
    from .executor import Stage
    out = []
    for s in stages:
        if s.name in ("tokenizer", "tokenize", "finalize"):
            s = Stage(s.name, s.n_tasks, {"tokenizer": tokenizer_task, "tokenize": tokenize_task,
                                          "finalize": functools.partial(finalize_task, s.fn)}[s.name])
        out.append(s)
        if s.name == "shard":
            out.append(Stage("loss_mask", 1, loss_mask_task))
    return out
