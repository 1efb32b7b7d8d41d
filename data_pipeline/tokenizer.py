"""Tokenizer training (stage ``tokenizer``) and encoding (stage ``tokenize``) with sentencepiece.

Ids are fixed: unk=0 bos=1 eos=2 pad=3. Training sees a deterministic sample of the kept (cleaned, filtered,
deduped) training-split text, chosen by a hash of the document id, and writes the model through
``model_writer`` with a fixed thread count, so the .model bytes depend only on the data and config (a
sentencepiece model records its model_prefix and num_threads: neither may vary). Each document is encoded
(exactly ``sp.encode``, through the word cache of encode_cache.py when the model allows it) and followed by EOS;
uint16 ids when the vocabulary fits, else int32 (shards.token_dtype)."""
from __future__ import annotations

import io
import os

import numpy as np
import sentencepiece as spm
import xxhash

from .atomic_io import read_jsonl, write_bytes
from .config import ConfigError
from .dedup.stages import load_removed
from .encode_cache import CachedEncoder, not_cacheable
from .executor import PipelineError
from .shards import ShardWriter, token_dtype
from .work_dirs import prepared_path, task_shard_prefix

SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
TRAIN_THREADS = 2  # recorded in the .model: fixed so the bytes never depend on the machine


def hash_fraction(doc_id: str, seed: int) -> float:
    """Deterministic number in [0, 1) from a document id."""
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed) / 2.0 ** 64


def is_valid(doc_id: str, cfg) -> bool:
    return hash_fraction(doc_id, cfg.shards.split_seed) < cfg.shards.valid_fraction


def kept_docs(ctx, rank: int):
    """Documents of one task that survived filtering and dedup, in input order."""
    removed = load_removed(ctx.work, rank)
    for i, doc in enumerate(read_jsonl(prepared_path(ctx.work, rank))):
        if i not in removed:
            yield doc


def check_model_path(path: str) -> None:
    """A given tokenizer.model_path must be a sentencepiece model: checked before the first stage runs (found in
    the tokenizer stage, it came after the whole prepare stage, as a protobuf error naming no key)."""
    if not path:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer.model_path={path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:  # parses as an empty model, which fails only at its first use
            raise ConfigError(f"tokenizer.model_path={path}: not a sentencepiece model (an empty file)")
        spm.SentencePieceProcessor(model_proto=data)
    except OSError as e:
        raise ConfigError(f"tokenizer.model_path={path}: cannot read it ({e.strerror})") from None
    except RuntimeError:  # sentencepiece's message quotes its C++ source, not the file
        raise ConfigError(f"tokenizer.model_path={path}: not a sentencepiece model (it does not parse as one)") from None


def model_path(ctx) -> str:
    return os.path.join(ctx.cfg.output_dir, "tokenizer.model")


def _sample_lines(ctx, rate: float, counts: dict):
    for t in range(ctx.n_tasks):
        for doc in kept_docs(ctx, t):
            if is_valid(doc["id"], ctx.cfg) or hash_fraction(doc["id"], ctx.cfg.tokenizer.seed) >= rate:
                continue
            counts["docs"] += 1
            counts["bytes"] += len(doc["text"].encode("utf-8"))
            for line in doc["text"].split("\n"):
                if line.strip():
                    yield line


def train_tokenizer_task(ctx, _rank: int) -> dict:
    tcfg = ctx.cfg.tokenizer
    if tcfg.model_path:
        if not os.path.isfile(tcfg.model_path):
            raise PipelineError(f"tokenizer.model_path: no such file: {tcfg.model_path}")
        data = open(tcfg.model_path, "rb").read()
        sp = spm.SentencePieceProcessor(model_proto=data)
        write_bytes(model_path(ctx), data)
        return {"trained": False, "source": tcfg.model_path, "vocab_size": sp.vocab_size(),
                "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
                "word_cache": not_cacheable(sp) or "usable"}
    total = sum(s["kept_bytes"] for s in ctx.prepare_stats)
    rate = min(1.0, tcfg.sample_bytes / max(1, total))
    counts = {"docs": 0, "bytes": 0}
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sample_lines(ctx, rate, counts), model_writer=buf,
            model_type=tcfg.model_type, vocab_size=tcfg.vocab_size, character_coverage=tcfg.character_coverage,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=tcfg.max_sentence_length,
            input_sentence_size=0, num_threads=TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise PipelineError(f"tokenizer training failed on {counts['docs']} sampled documents ({counts['bytes']} "
                            f"bytes): {str(e).strip().splitlines()[-1]} (lower tokenizer.vocab_size or add data)") from None
    write_bytes(model_path(ctx), buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return {"trained": True, "model_type": tcfg.model_type, "vocab_size": sp.vocab_size(),
            "special_ids": dict(SPECIAL_IDS), "sample_rate": round(rate, 6), "sample_docs": counts["docs"],
            "sample_bytes": counts["bytes"], "word_cache": not_cacheable(sp) or "usable"}


BATCH_CHARS = 1 << 16  # a batch also ends at this many characters: bounded memory whatever the documents


def encode_ids(sp, texts: list[str], threads: int) -> list:
    """Each document's ids by sentencepiece itself (models the word cache cannot take apart): int32 arrays from
    sentencepiece >= 0.2.1 (``out_type="numpy"``), else lists. On one thread, one call per document beats the list
    API (measured: its thread-pool dispatch costs ~8%); on more, the list API spreads the batch over ``threads``
    (-1: every core)."""
    try:
        if threads == 1:
            return [sp.encode(t, out_type="numpy") for t in texts]
        return sp.encode(texts, num_threads=threads, out_type="numpy")
    except (ValueError, TypeError):  # no numpy output in this sentencepiece
        return sp.encode(texts, num_threads=threads)


_ENCODER: dict = {}  # this worker's cached encoder: its words carry over from task to task


def make_encoder(sp, dtype, cache_words: int, threads: int):
    """``encode(texts) -> [ids as bytes of dtype]``: the word cache (encode_cache.py) when the model allows it,
    else sentencepiece document by document. Exactly ``sp.encode`` either way."""
    if cache_words <= 0 or not_cacheable(sp):
        return lambda texts: [np.asarray(a, dtype=dtype).tobytes() for a in encode_ids(sp, texts, threads)]
    key = (xxhash.xxh64_hexdigest(sp.serialized_model_proto()), np.dtype(dtype).str, cache_words)
    if _ENCODER.get("key") != key:
        _ENCODER.update(key=key, encoder=CachedEncoder(sp, dtype, cache_words))
    return _ENCODER["encoder"].encode


def assemble(encoded: list[bytes], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Ids of a batch (raw bytes of ``dtype``, one per document) -> (all ids with an EOS after each document,
    lengths with the EOS): one join, no per-document write."""
    eos_bytes = np.array([eos], dtype=dtype).tobytes()
    tokens = np.frombuffer(eos_bytes.join(encoded) + eos_bytes if encoded else b"", dtype=dtype)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) // np.dtype(dtype).itemsize + 1
    return tokens, lengths


def encode_block(sp, texts: list[str], eos: int, dtype, threads: int = 1, cache_words: int = 0):
    return assemble(make_encoder(sp, dtype, cache_words, threads)(texts), eos, dtype)


def batches(docs, max_docs: int, max_chars: int = BATCH_CHARS):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc["text"])
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_task(ctx, rank: int) -> dict:
    """Encode one task's kept documents into ``work/tokens/{train,valid}-RANK`` (.bin/.idx/.ids), one write per
    batch and split. ``make_encoder`` says how a batch is encoded."""
    cfg = ctx.cfg
    sp = spm.SentencePieceProcessor(model_file=model_path(ctx))
    eos = sp.eos_id()
    dtype = token_dtype(sp.vocab_size())
    threads = 1 if cfg.workers > 1 else -1  # processes already use the cores; one worker uses every thread
    encode = make_encoder(sp, dtype, cfg.tokenizer.encode_cache_words, threads)
    writers = {s: ShardWriter(task_shard_prefix(ctx.work, s, rank), dtype) for s in ("train", "valid")}
    ids_out = {s: [] for s in writers}
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in writers}

    def write(batch: list[dict]) -> None:
        tokens, lengths = assemble(encode([d["text"] for d in batch]), eos, dtype)
        valid = np.fromiter((is_valid(d["id"], cfg) for d in batch), dtype=bool, count=len(batch))
        for split, docs_mask in (("train", ~valid), ("valid", valid)):
            if not docs_mask.any():
                continue
            everything = bool(docs_mask.all())
            block = tokens if everything else tokens[np.repeat(docs_mask, lengths)]
            writers[split].add_documents(block, lengths if everything else lengths[docs_mask])
            chosen = batch if everything else [d for d, v in zip(batch, docs_mask) if v]
            ids_out[split].extend(d["id"] for d in chosen)
            st = stats[split]
            st["docs"] += len(chosen)
            st["tokens"] += len(block)
            st["bytes"] += sum(len(d["text"].encode("utf-8")) for d in chosen)

    try:
        for batch in batches(kept_docs(ctx, rank), cfg.shards.batch_docs):
            write(batch)
        for s, w in writers.items():
            write_bytes(task_shard_prefix(ctx.work, s, rank) + ".ids", "".join(i + "\n" for i in ids_out[s]).encode())
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return stats
