"""Exact, memoised sentencepiece encoding for the tokenize stage: each space-separated word is encoded once per
worker and then copied, which is what makes the stage faster than a plain ``sentencepiece.encode`` loop.

Why the ids are exactly those of ``sp.encode(text)``: with the identity normalizer (no NFKC map, no whitespace
folding) sentencepiece encodes ``"\u2581" + text.replace(" ", "\u2581")`` (the dummy prefix, then spaces escaped).
Cut that string before every run of "\u2581" that follows another character. If no piece of the vocabulary spans
such a cut (checked on every piece of the model at start-up), BPE can never merge across it: BPE only forms
pieces of the vocabulary, and its merge order restricted to one side of the cut (best score first, ties to the
left) does not depend on the other side; byte fallback works per symbol. So the ids of the text are the ids of its
parts, one after another, and each part is ``" " + word`` encoded without a dummy prefix. Texts that hold the
"\u2581" character itself are encoded whole. Models that do not meet every condition (unigram, a normalization
rule, whitespace folding, no byte fallback, pieces across a cut) are encoded whole, document by document.
tests/data_pipeline/test_encode_cache.py compares every path with ``sp.encode`` on adversarial texts."""
from __future__ import annotations

import re

import numpy as np
import sentencepiece as spm

SPACE = "\u2581"
PARTS = re.compile(r" *[^ ]+| +")  # of " " + text: each run of spaces with the word after it (or a trailing run)


def ids_array(sp: spm.SentencePieceProcessor, text: str) -> np.ndarray:
    """sentencepiece >= 0.2.1 returns int32 arrays (no Python int per token); older releases return lists."""
    try:
        return sp.encode(text, out_type="numpy")
    except (ValueError, TypeError):
        return np.asarray(sp.encode(text), dtype=np.int32)


def not_cacheable(sp: spm.SentencePieceProcessor) -> str:
    """Why ``sp``'s encoding cannot be taken apart at spaces ('' when it can)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
    except ImportError as e:
        return f"cannot read the model proto ({e})"
    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    norm, train = m.normalizer_spec, m.trainer_spec
    checks = [(train.model_type == pb.TrainerSpec.BPE, "not a BPE model"),
              (train.byte_fallback, "no byte fallback"),
              (not norm.precompiled_charsmap, f"normalization rule {norm.name!r}"),
              (not norm.remove_extra_whitespaces, "remove_extra_whitespaces"),
              (norm.add_dummy_prefix and norm.escape_whitespaces, "no dummy prefix or unescaped spaces"),
              (not train.treat_whitespace_as_suffix, "treat_whitespace_as_suffix"),
              (not any(re.search(f"[^{SPACE}]{SPACE}", p.piece) for p in m.pieces), "pieces span a word start")]
    return next((why for ok, why in checks if not ok), "")


class CachedEncoder:
    """``encode(texts)`` -> each text's ids as raw bytes of ``dtype`` (the shard's token type), exactly
    ``sp.encode(text)``. Keeps at most ``max_words`` words (then starts over: memory stays bounded)."""

    def __init__(self, sp: spm.SentencePieceProcessor, dtype, max_words: int):
        from sentencepiece import sentencepiece_model_pb2 as pb
        self.sp, self.dtype, self.max_words = sp, np.dtype(dtype), max_words
        m = pb.ModelProto()
        m.ParseFromString(sp.serialized_model_proto())
        m.normalizer_spec.add_dummy_prefix = False  # a word's part brings its own leading space
        self.raw = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        # bytes of text behind each id; -2**40 marks ids that never stand for text (unk, control): a cut that
        # lands on one can never match, and the words are then encoded one by one
        kinds = pb.ModelProto.SentencePiece
        texts = (kinds.NORMAL, kinds.USER_DEFINED)
        self.text_bytes = np.array([1 if p.type == kinds.BYTE else len(p.piece.replace(SPACE, " ").encode())
                                    if p.type in texts else -2 ** 40 for p in m.pieces], dtype=np.int64)
        self.words: dict[str, bytes] = {}
        self.stats = {"words": 0, "new_words": 0}

    def encode(self, texts: list[str]) -> list[bytes]:
        out: list = [b""] * len(texts)
        pending = []
        join, get = b"".join, self.words.__getitem__
        for i, text in enumerate(texts):
            if not text:
                continue
            if SPACE in text:
                out[i] = self._whole(text)
                continue
            if text[0] == " " or text[-1] == " " or "  " in text:
                words = [part[1:] for part in PARTS.findall(" " + text)]
            else:
                words = text.split(" ")
            self.stats["words"] += len(words)
            try:
                out[i] = join(map(get, words))
            except KeyError:
                pending.append((i, words))
        if pending:
            if len(self.words) > self.max_words:
                self.words.clear()
            self._learn([w for w in dict.fromkeys(w for _, words in pending for w in words) if w not in self.words])
            for i, words in pending:
                out[i] = join(map(get, words))
        return out

    def _whole(self, text: str) -> bytes:
        return ids_array(self.sp, text).astype(self.dtype).tobytes()

    def _learn(self, new: list[str]) -> None:
        """Encode new words in one call: ``" " + word`` for each, one after another, is cut back into words where
        the text bytes of the ids add up to each word's end. A word that ends in a space (only a text's trailing
        run of spaces) or is empty cannot be followed by a cut, so it is encoded alone."""
        self.stats["new_words"] += len(new)
        alone = [w for w in new if not w or w[-1] == " "]
        joined = [w for w in new if w and w[-1] != " "]
        if joined:
            ids = ids_array(self.raw, " " + " ".join(joined)).astype(np.int64)
            ends = np.cumsum(self.text_bytes[ids])
            word_ends = np.cumsum(np.fromiter((len(w.encode()) + 1 for w in joined), np.int64, len(joined)))
            at = np.minimum(np.searchsorted(ends, word_ends), len(ends) - 1)
            if len(ids) and (ends[at] == word_ends).all():
                tokens = ids.astype(self.dtype)
                starts = np.concatenate([[0], at[:-1] + 1]).tolist()
                for w, s, e in zip(joined, starts, (at + 1).tolist()):
                    self.words[w] = tokens[s:e].tobytes()
            else:  # never seen; a safety net, not a path: encode the words one by one
                alone += joined
        for w in alone:
            self.words[w] = ids_array(self.raw, " " + w).astype(self.dtype).tobytes()
