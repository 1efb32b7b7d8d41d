"""``python -m data_pipeline merge OUT IN...``: concatenate shards into ``OUT.bin``/``OUT.idx``, refusing in one
line (ConfigError, exit 2) what would lose or mix data:

- an existing ``OUT.bin``/``OUT.idx``/``OUT.stats.json`` unless ``--force``; an OUT that is one of the inputs
  always (an input would be replaced by a file that contains it);
- inputs made with different tokenizers: the same ids would mean other text. A shard's tokenizer is the
  ``tokenizer.model`` of its pipeline output (two folders up, or beside it), compared by vocabulary (pieces in
  id order, llmforge.common.tokenizers.tokenizer_identity); without one, the ``tokenizer.vocab_size`` its output's
  ``stats.json`` records. Shards with neither (loose copies, other tools' shards) are checked by their data: an
  input holding a token id beyond a known tokenizer's vocabulary is refused. OUT placed in a pipeline output (say
  ``A/shards/``) is checked the same way against the tokenizer found there, which training would pair it with.

The output is written by ShardWriter: temp files renamed into place, the ``.idx`` last, so a failed or killed merge
leaves no ``OUT`` files (with ``--force``: the old ones, until the complete new ones are renamed over them).
"""
from __future__ import annotations

import json
import os

from llmforge.common.shards import STATS_EXT, find_tokenizer, merge_shards, shard_max_id
from llmforge.common.typed_config import ConfigError

from .executor import PipelineError


def _prefix(p: str) -> str:
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def tokenizer_of(prefix: str) -> tuple[str, int, str | None] | None:
    """(how to name it, vocabulary size, vocabulary hash or None) of the tokenizer a shard was made with; None
    when nothing records it."""
    model = find_tokenizer([prefix])
    if model:
        import sentencepiece as spm
        from llmforge.common.tokenizers import tokenizer_identity
        try:
            size = spm.SentencePieceProcessor(model_file=model).vocab_size()
        except Exception as e:  # noqa: BLE001 - sentencepiece raises its own types for a file that is not a model
            raise ConfigError(f"merge: {model} (the tokenizer of {prefix}) is not a sentencepiece model "
                              f"({type(e).__name__})") from None
        return f"{model}, vocab {size}", size, tokenizer_identity(model)
    stats = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(prefix))), "stats.json")
    try:
        with open(stats, encoding="utf-8") as f:
            size = int(json.load(f)["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"vocab {size} per {stats}", size, None


def check_same_tokenizer(prefixes: list[str], out: str | None = None) -> None:
    """Refuse inputs whose tokenizers differ (by vocabulary when both have a tokenizer.model, else by size),
    naming the two shards and their tokenizers; then any input whose token ids do not fit a known tokenizer (one
    that records none, e.g. a loose copy of a 4096-vocab shard beside a 1024 one), and the tokenizer found where
    OUT goes (training reads OUT with it)."""
    seen = []  # (prefix, tokenizer_of(prefix))
    where = [(p, p) for p in prefixes] + ([(out, f"the folder of the output {out}")] if out else [])
    for prefix, name in where:
        tok = tokenizer_of(prefix)
        if tok is None:
            continue
        for other, known in seen:
            if (known[2] != tok[2]) if known[2] and tok[2] else (known[1] != tok[1]):
                raise ConfigError(f"merge: {other} ({known[0]}) and {name} ({tok[0]}) were made with different "
                                  "tokenizers: merge only shards made with one tokenizer")
        seen.append((name, tok))
    for prefix in prefixes if seen else ():
        top = shard_max_id(prefix)
        for other, known in seen:
            if top >= known[1]:
                raise ConfigError(f"merge: {prefix} holds token id {top}, beyond the vocabulary of {other} "
                                  f"({known[0]}): made with a different tokenizer; merge only shards made with one")


def merge(out: str, inputs: list[str], force: bool = False) -> None:
    out, prefixes = _prefix(out), [_prefix(p) for p in inputs]
    for p in prefixes:
        if not os.path.isfile(p + ".idx"):
            raise FileNotFoundError(f"shard not found: {p}.idx")
    if any(os.path.realpath(out) == os.path.realpath(p) for p in prefixes):
        raise ConfigError(f"merge: the output {out} is also an input: choose another output prefix")
    existing = [out + ext for ext in (".bin", ".idx", STATS_EXT) if os.path.lexists(out + ext)]
    folders = [p for p in existing if os.path.isdir(p)]
    if folders:  # --force replaces files; a folder of that name is not an earlier merge's output
        raise ConfigError(f"merge: {folders[0]} is a folder, not a shard file: choose another output prefix")
    if existing and not force:
        raise ConfigError(f"merge: {existing[0]} exists: choose another output prefix, or pass --force to "
                          "replace it")
    check_same_tokenizer(prefixes, out)
    try:
        merge_shards(prefixes, out)
    except OSError as e:  # disk full, read-only folder: the temp files are gone, OUT is as it was
        raise PipelineError(f"merge: cannot write {e.filename or out}: {e.strerror or e}") from None
