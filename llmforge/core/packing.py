"""Document boundaries inside a packed batch, carried in the batch tensor itself.

Batches stay one int64 tensor ``(B, seq_len + 1)`` through every engine (llmforge/core/loss.py stores a token
that is not a loss target as ``-1 - id``). With ``data.document_mask`` (pretraining windows) or ``sft.pack``
(conversations packed by llmforge/data/sft.py) the data stream also marks the first token of every document by
adding ``DOC_START`` (2**40, far above any vocabulary) to its id before that encoding. ``split_batch``
(core/loss.py) strips the mark; ``batch_positions`` turns the marks into each input token's position inside its
document (0 at a document start and at the start of the window, whose first document began earlier or there),
the ``positions`` the model takes (llmforge/model/attention.py).
"""
from __future__ import annotations

import numpy as np
import torch

DOC_START = 1 << 40
ID_MASK = DOC_START - 1


def mark_doc_starts(window: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``window`` (int64 ids) with DOC_START added at the offsets ``starts`` (documents beginning there)."""
    out = np.asarray(window, dtype=np.int64).copy()
    out[starts] += DOC_START
    return out


def raw_ids(batch: torch.Tensor) -> torch.Tensor:
    """Token ids with any DOC_START mark removed (the ``-1 - id`` loss-mask encoding kept)."""
    # unconditionally (a few element-wise ops): testing for marks first would sync the device every step
    plain = torch.where(batch >= 0, batch, -1 - batch) & ID_MASK
    return torch.where(batch >= 0, plain, -1 - plain)


def batch_positions(batch: torch.Tensor) -> torch.Tensor:
    """(B, seq_len) position of each input token (``batch[:, :-1]``) inside its document."""
    x = batch[:, :-1]
    start = torch.where(x >= 0, x, -1 - x) >= DOC_START
    start[:, 0] = True
    index = torch.arange(x.shape[1], device=x.device).expand_as(x)
    last_start = torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def marked_positions(batch: torch.Tensor, always: bool = False) -> torch.Tensor | None:
    """``batch_positions`` when the batch marks a document start after its first token (or ``always``), else
    None: without a mark the positions are 0..seq_len-1 and attention is plain causal, so the fast path is exact."""
    if always or bool((batch[:, 1:-1].abs() >= DOC_START).any()):
        return batch_positions(batch)
    return None
