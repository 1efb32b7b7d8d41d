"""Document masking is exact: each document of a packed sequence gets the logits it gets alone from position 0."""
import numpy as np
import pytest
import torch

from llmforge.core.loss import split_batch
from llmforge.core.packing import DOC_START, batch_positions, mark_doc_starts, marked_positions
from llmforge.model.attention import build_mask
from llmforge.model.blocks import ModelArgs
from llmforge.model.transformer import Transformer

LENGTHS = (7, 1, 12, 9)  # one document of a single token


def packed(vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]
    return docs, torch.cat(docs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_logits_equal_each_document_alone(family):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(family=family, vocab_size=50, n_kv_heads=2 if family == "llama" else 4)).eval()
    docs, seq = packed()
    starts = np.cumsum((0,) + LENGTHS[:-1])
    batch = torch.from_numpy(mark_doc_starts(np.append(seq.numpy(), 5), starts))[None]
    positions = batch_positions(batch)
    x, _ = split_batch(batch)
    assert torch.equal(x[0], seq)
    assert positions[0].tolist() == [i for n in LENGTHS for i in range(n)]
    with torch.no_grad():
        out = model(x, positions=positions)[0]
        plain = model(x)[0]
        for doc, s in zip(docs, starts):
            alone = model(doc[None])[0]
            torch.testing.assert_close(out[s:s + len(doc)], alone, rtol=0, atol=1e-5)
    assert (out[starts[1]:] - plain[starts[1]:]).abs().max() > 1e-3  # the mask changes what crosses a boundary


def test_gradients_stay_inside_each_document():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=50))
    docs, seq = packed()
    starts = np.cumsum((0,) + LENGTHS[:-1])
    batch = torch.from_numpy(mark_doc_starts(np.append(seq.numpy(), 5), starts))[None]
    emb = model.tok_embeddings(split_batch(batch)[0]).detach().requires_grad_(True)
    model.tok_embeddings = None
    out = model(emb, positions=batch_positions(batch))
    out[0, starts[2] + 3].sum().backward()  # a token of the third document
    touched = emb.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert touched == list(range(starts[2], starts[2] + 4))


def test_no_mark_means_plain_causal_and_masks_survive_the_sft_encoding():
    row = np.arange(10, 21)
    assert marked_positions(torch.from_numpy(row)[None]) is None
    marked = mark_doc_starts(row, np.array([0, 4]))
    sft = np.where(np.arange(11) < 6, -1 - marked, marked)  # prompt tokens stored as -1 - id
    x, y = split_batch(torch.from_numpy(sft)[None])
    assert x[0].tolist() == list(range(10, 20)) and (y[0, :5] == -100).all() and y[0, 5:].tolist() == list(range(16, 21))
    assert batch_positions(torch.from_numpy(sft)[None])[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert marked_positions(torch.from_numpy(sft)[None]) is not None and DOC_START > 2 ** 32


def test_flex_block_mask_equals_the_dense_mask():
    """The CUDA path (FlexAttention BlockMask) against the CPU one, forward only (flex has no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention
    torch.manual_seed(0)
    n, heads, hd = 128, 2, 16
    positions = torch.tensor([list(range(40)) + list(range(88)), list(range(128))])
    index = torch.arange(n)
    starts = index[None] - positions
    q, k, v = (torch.randn(2, heads, n, hd) for _ in range(3))
    dense = build_mask(index, starts, index, starts, q, flex=False)
    block = build_mask(index, starts, index, starts, q, flex=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=block), ref, rtol=0, atol=1e-5)
