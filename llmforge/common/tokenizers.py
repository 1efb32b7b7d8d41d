"""What a tokenizer file means, independent of its bytes: its vocabulary in id order and a hash of it (the
trainer's data checks and the pipeline's merge both compare tokenizers this way)."""
from __future__ import annotations

import hashlib


def tokenizer_pieces(path: str) -> list:
    """The vocabulary in id order: a sentencepiece ``tokenizer.model``, or a Hugging Face ``tokenizer.json`` (its
    model's vocabulary plus added tokens; an id without a piece is None). A tokenizer.json converted from a
    sentencepiece model keeps its pieces (``▁`` word starts, ``<0x0A>`` bytes), so the two compare directly."""
    if path.endswith(".json"):
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)  # piece -> id
        pieces = [None] * (max(vocab.values(), default=-1) + 1)
        for piece, i in vocab.items():
            pieces[i] = piece
        return pieces
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    return [sp.id_to_piece(i) for i in range(sp.vocab_size())]


def tokenizer_identity(model_file: str) -> str:
    """A hash of the vocabulary (pieces in id order): what token ids mean. Two files with equal pieces encode
    ids identically even if their bytes differ (sentencepiece records e.g. its training prefix)."""
    pieces = "\n".join(tokenizer_pieces(model_file))
    return hashlib.sha256(pieces.encode("utf-8")).hexdigest()
