"""Checks of training data against itself and the model, run before any collective (each rank runs them alone,
so a bad blend fails with one line instead of an IndexError deep in the embedding on every rank):

- every ``data.paths`` entry that has a tokenizer was made with the same one (same pieces in the same order);
- no shard holds a token id >= the model's vocab_size (the largest id is read from the tokens, never taken from
  the stats sidecar, which may under-report; cached per file version in ``$XDG_CACHE_HOME/llmforge``, keyed by
  device, inode, size, mtime and ctime: ctime changes on every write and cannot be set back, so a hit never hides
  an edit).
"""
from __future__ import annotations

import json
import os

from llmforge.common.shards import STATS_EXT, shard_max_id
from llmforge.common.tokenizers import tokenizer_identity, tokenizer_pieces
from llmforge.core.config import ConfigError


def tokenizer_of(path: str) -> str | None:
    """The tokenizer.model of one data.paths entry (a pipeline output dir, or a shard prefix/glob in one)."""
    from llmforge.data.streams import find_tokenizer
    return find_tokenizer([path])


def model_tokenizer(folder: str) -> str | None:
    """The tokenizer file of a model folder (a run dir or a Hugging Face folder): tokenizer.model first."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def check_init_tokenizer(key: str, src: str, data_tok: str | None, allow: bool) -> None:
    """Refuse starting from a model (``key`` = train.init_from / init_from_hf, ``src`` its folder) whose tokenizer
    is not the data's: the same ids would mean other text. Compared by pieces in id order when both have a
    tokenizer file (vocabulary sizes and the shards' ids are checked against the model elsewhere);
    ``allow`` (train.allow_tokenizer_change) turns the refusal into a warning."""
    model_tok = model_tokenizer(src)
    if model_tok is None or data_tok is None:
        return  # nothing to compare: the vocab size and the shards' largest id are still checked
    try:
        a, b = tokenizer_pieces(model_tok), tokenizer_pieces(data_tok)
    except Exception as e:  # sentencepiece/tokenizers raise their own types for a file that is not a tokenizer
        raise ConfigError(f"{key}={src}: cannot read tokenizer {model_tok} or {data_tok} ({type(e).__name__})") from None
    if a == b:
        return
    what = (f"{key}={src}: the model's tokenizer {model_tok} ({len(a)} ids) is not the data's {data_tok} "
            f"({len(b)} ids): the same ids would mean other text")
    if allow:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: {what} (train.allow_tokenizer_change=true)", flush=True)
        return
    hint = f"tokenizer.model_path={model_tok}" if model_tok.endswith(".model") else "the model's tokenizer"
    raise ConfigError(f"{what}; tokenize the data with {hint}, or set train.allow_tokenizer_change=true to fine-tune "
                      "across tokenizers")


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


def _max_id_cache(prefix: str) -> str:
    import xxhash
    st = os.stat(prefix + ".bin")
    key = f"{os.path.abspath(prefix)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "llmforge", "max-token-id", xxhash.xxh3_128_hexdigest(key.encode()))


def _cached(cache: str) -> int | None:
    try:
        with open(cache) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def data_max_id(prefix: str) -> int:
    """The largest token id in a shard's .bin (shard_max_id), read once per file version. The ranks of a node
    start together with the same cache: one reads the tokens under a flock on the entry, the others wait for
    its answer instead of each reading the whole .bin."""
    import fcntl

    from llmforge.common.atomic import write_text
    cache = _max_id_cache(prefix)
    top = _cached(cache)
    if top is not None:
        return top
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        fd = os.open(cache + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only home: no cache, the tokens are read every time
        return shard_max_id(prefix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        top = _cached(cache)  # written by the rank that held the lock before us
        if top is None:
            top = shard_max_id(prefix)
            try:
                write_text(cache, str(top))
            except OSError:  # disk full / quota: the answer stands, uncached
                pass
        return top
    finally:
        os.close(fd)  # drops the flock


def _sidecar_differs(prefix: str, top: int) -> str:
    """' (its .stats.json says N)' when the sidecar under- or over-reports the real largest id, else ''."""
    try:
        with open(prefix + STATS_EXT) as f:
            said = int(json.load(f)["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (its {STATS_EXT} says {said})" if said != top else ""


def check_data_against_model(paths: list[str], vocab_size: int | None) -> None:
    """Refuse shards (train and valid) holding a token id >= ``vocab_size``, naming the shard and the id."""
    if not vocab_size:
        return
    from llmforge.data.streams import _shard_prefixes
    for p in paths:
        for prefix in _shard_prefixes(p, "train") + _shard_prefixes(p, "valid"):
            top = data_max_id(prefix)
            if top >= vocab_size:
                said = _sidecar_differs(prefix, top)
                raise ConfigError(f"data.paths: {os.path.abspath(prefix)} holds token id {top}{said} but the model's "
                                  f"vocab_size is {vocab_size}: set model.vocab_size >= {top + 1}, or use data made "
                                  f"with the model's tokenizer")


def check_data(data_cfg, vocab_size: int | None) -> None:
    check_same_tokenizer(list(data_cfg.paths))
    check_data_against_model(list(data_cfg.paths), vocab_size)
