"""Checks of training data against itself and the model, run before any collective (each rank runs them alone,
so a bad blend fails with one line instead of an IndexError deep in the embedding on every rank):

- every ``data.paths`` entry that has a tokenizer was made with the same one (same pieces in the same order);
- no shard holds a token id >= the model's vocab_size (the largest id comes from the shard's stats sidecar that
  the pipeline writes, or from reading the tokens of shards made by other tools).
"""
from __future__ import annotations

import hashlib
import os

from llmforge.common.shards import shard_max_id
from llmforge.config import ConfigError


def tokenizer_of(path: str) -> str | None:
    """The tokenizer.model of one data.paths entry (a pipeline output dir, or a shard prefix/glob in one)."""
    from llmforge.data import find_tokenizer
    return find_tokenizer([path])


def tokenizer_identity(model_file: str) -> str:
    """A hash of the vocabulary (pieces in id order): what token ids mean. Two files with equal pieces encode
    ids identically even if their bytes differ (sentencepiece records e.g. its training prefix)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)
    pieces = "\n".join(sp.id_to_piece(i) for i in range(sp.vocab_size()))
    return hashlib.sha256(pieces.encode("utf-8")).hexdigest()


def check_same_tokenizer(paths: list[str]) -> None:
    """Refuse a blend of data folders made with different tokenizers (their ids mean different text)."""
    first = None  # (path, tokenizer file, identity)
    for p in paths:
        tok = tokenizer_of(p)
        if tok is None:
            continue  # shards without a tokenizer (synthetic or foreign): nothing to compare
        ident = tokenizer_identity(tok)
        if first is None:
            first = (p, tok, ident)
        elif ident != first[2]:
            raise ConfigError(f"data.paths: {first[0]} and {p} were made with different tokenizers ({first[1]} vs "
                              f"{tok}); blend only data tokenized with one tokenizer (build the others with "
                              f"tokenizer.model_path={first[1]})")


def check_data_against_model(paths: list[str], vocab_size: int | None) -> None:
    """Refuse shards (train and valid) holding a token id >= ``vocab_size``, naming the shard and the id."""
    if not vocab_size:
        return
    from llmforge.data import _shard_prefixes
    for p in paths:
        for prefix in _shard_prefixes(p, "train") + _shard_prefixes(p, "valid"):
            top = shard_max_id(prefix)
            if top >= vocab_size:
                raise ConfigError(f"data.paths: {os.path.abspath(prefix)} holds token id {top} but the model's "
                                  f"vocab_size is {vocab_size}: set model.vocab_size >= {top + 1}, or use data made "
                                  f"with the model's tokenizer")


def check_data(data_cfg, vocab_size: int | None) -> None:
    check_same_tokenizer(list(data_cfg.paths))
    check_data_against_model(list(data_cfg.paths), vocab_size)
