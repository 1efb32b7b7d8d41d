"""MoE block (llmforge/model/moe.py) and its load balancing (llmforge/train/moe_balance.py), checked against
references written out by hand: dropless routing, a naive per-token mixture, the auxiliary loss's gradient
injected in backward, the per-step statistics, the grouped-GEMM path against the exact loop, and the expert-bias
update and metrics. Tiny sizes, CPU, fp64 where exactness is asserted."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmforge.model.blocks import ModelArgs
from llmforge.model.moe import MoE, MoEArgs, grouped_mm_experts, loop_experts, moe_layers, sequence_aux_loss
from llmforge.model.transformer import Transformer
from llmforge.train.moe_balance import MoEBalance

DIM, FFN, E = 32, 16, 4


def make_moe(dtype=torch.float64, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    args = MoEArgs(**{"num_experts": E, "top_k": 2, "ffn_dim": FFN, **kw})
    moe = MoE(DIM, 48, args).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.2)
    moe.reset_buffers()
    return moe


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the k selected experts' SwiGLU, each times its routing weight, plus the shared experts."""
    a, ex = moe.args, moe.experts
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = (flat[t] @ moe.router.gate.weight.T).float()  # the router computes its scores in fp32
        scores = torch.sigmoid(logits) if a.score == "sigmoid" else torch.softmax(logits, -1)
        select = scores + moe.expert_bias.float() if a.balance == "bias" else scores
        chosen = sorted(range(a.num_experts), key=lambda e: -float(select[e].detach()))[:a.top_k]
        w = scores[chosen]
        if a.norm_topk:
            w = w / w.sum()
        w = (w * a.route_scale).to(flat.dtype)
        for e, we in zip(chosen, w):
            out[t] += we * swiglu(flat[t], ex.w1[e], ex.w2[e], ex.w3[e])
        if moe.shared is not None:
            s = moe.shared
            out[t] += swiglu(flat[t], s.w1.weight, s.w2.weight, s.w3.weight)
    return out.view_as(x)


# a. dropless: every token reaches its expert, however unbalanced the load -----------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_dropless_all_tokens_to_one_expert(top_k, tokens):
    moe = make_moe(top_k=top_k, balance="bias").eval()
    hot = [2] if top_k == 1 else [2, 0]
    with torch.no_grad():
        moe.expert_bias[hot] = 1e3  # selection only: the weights still come from the scores
    x = torch.randn(1, tokens, DIM, dtype=torch.float64)
    with torch.no_grad():
        out = moe(x)
        scores = torch.softmax((x[0] @ moe.router.gate.weight.T).float(), -1)  # the router scores in fp32
        w = (scores[:, hot] / scores[:, hot].sum(-1, keepdim=True)).double()  # norm_topk; top_k=1: exactly 1
        ex = moe.experts
        want = sum(w[:, j:j + 1] * swiglu(x[0], ex.w1[e], ex.w2[e], ex.w3[e]) for j, e in enumerate(hot))
    if top_k == 1:
        assert torch.equal(w, torch.ones_like(w))
    torch.testing.assert_close(out[0], want, rtol=0, atol=1e-12)
    assert out.abs().min(-1).values.gt(0).all()  # no row left at zero (no dropped token)


def test_dropless_stats_count_every_token():
    moe = make_moe(top_k=1, balance="bias").train()
    with torch.no_grad():
        moe.expert_bias[3] = 1e3
    x = torch.randn(2, 50, DIM, dtype=torch.float64, requires_grad=True)
    moe(x).sum().backward()
    assert moe.tokens_per_expert.tolist() == [0, 0, 0, 100]


# b. against a naive per-token reference ---------------------------------------------------------------------

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("route_scale, shared", [(1.0, 0), (2.5, 1), (0.7, 2)])
def test_matches_naive_per_token_reference(score, norm_topk, route_scale, shared):
    moe = make_moe(score=score, norm_topk=norm_topk, route_scale=route_scale, shared_experts=shared,
                   seed=7 * shared + 2 * norm_topk + (score == "sigmoid"))
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    for mode in (moe.eval(), moe.train()):  # the training forward (with _AddAuxGrad) leaves the output unchanged
        with torch.no_grad():
            torch.testing.assert_close(mode(x), naive_moe(moe, x), rtol=0, atol=1e-6)
    x.requires_grad_(True)
    torch.testing.assert_close(moe.train()(x).detach(), naive_moe(moe, x).detach(), rtol=0, atol=1e-6)


def test_bias_steers_selection_not_weights():
    moe = make_moe(balance="bias", norm_topk=False)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        x = torch.randn(1, 11, DIM, dtype=torch.float64)
        torch.testing.assert_close(moe.eval()(x), naive_moe(moe, x), rtol=0, atol=1e-6)


# c. auxiliary loss injected in backward ----------------------------------------------------------------------

def tiny_model(seed=0, **moe_kw) -> Transformer:
    torch.manual_seed(seed)
    margs = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                      moe=MoEArgs(**{"num_experts": E, "top_k": 2, "ffn_dim": FFN, "aux_loss_coef": 0.3, **moe_kw}))
    return Transformer(margs).double()


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_gradient_equals_explicit_aux_loss(scale, score):
    tokens = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(1))
    injected = tiny_model(score=score).train()
    for _, m in moe_layers(injected):
        m.aux_grad_scale = scale
    lm_loss(injected, tokens).backward()

    ref = tiny_model(score=score).eval()  # eval: no injection; the aux loss is added to the objective by hand
    captured = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: captured.append(out)) for _, m in moe_layers(ref)]
    loss = lm_loss(ref, tokens)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    aux = sum(sequence_aux_loss(sc.view(b, s, -1), idx.view(b, s, -1), ref.args.moe) for sc, idx, _ in captured)
    (loss + scale * aux).backward()
    for h in hooks:
        h.remove()

    g_inj, g_ref = grads(injected), grads(ref)
    assert g_inj.keys() == g_ref.keys()
    gate = [n for n in g_ref if "router.gate" in n]
    assert len(gate) == 2
    for n in g_ref:
        torch.testing.assert_close(g_inj[n], g_ref[n], rtol=1e-9, atol=1e-12, msg=n)
    # the aux term matters for the router: without it the gradients differ
    lm_only = tiny_model(score=score).eval()
    lm_loss(lm_only, tokens).backward()
    assert any((lm_only.get_parameter(n).grad - g_ref[n]).abs().max() > 1e-8 for n in gate)
    # the recorded aux value is the explicit one (mean over micro batches: one here)
    recorded = sum(float(m.aux_total / m.aux_batches) for _, m in moe_layers(injected))
    assert recorded == pytest.approx(float(aux.detach()), rel=1e-12)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_aux_loss_invariant_to_batch_split(score):
    args = MoEArgs(num_experts=6, top_k=2, score=score, aux_loss_coef=0.01)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, 6, generator=g, dtype=torch.float64)
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    idx = scores.topk(2, -1).indices
    whole = sequence_aux_loss(scores, idx, args)
    halves = [sequence_aux_loss(scores[i:i + 2], idx[i:i + 2], args) for i in (0, 2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-12, atol=0)
    # value by hand for sequence 0: E * sum_i f_i P_i
    f = torch.bincount(idx[0].flatten(), minlength=6).double() / 20
    p = (scores[0] / scores[0].sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(sequence_aux_loss(scores[:1], idx[:1], args), 0.01 * 6 * (f * p).sum(),
                               rtol=1e-6, atol=0)
    # perfect balance: f = P = 1/E gives coef exactly
    uniform = torch.full((1, 6, 6), 1 / 6, dtype=torch.float64)
    idx_u = torch.tensor([[[i, (i + 1) % 6] for i in range(6)]])
    torch.testing.assert_close(sequence_aux_loss(uniform, idx_u, args), torch.tensor(0.01, dtype=torch.float64))


# d. statistics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_tokens_per_expert_sums_to_tokens_times_k(top_k):
    moe = make_moe(top_k=top_k).train()
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    moe(x).square().sum().backward()
    assert float(moe.tokens_per_expert.sum()) == 3 * 7 * top_k
    assert float(moe.aux_batches) == 1 and float(moe.aux_total) > 0


def test_no_grad_and_eval_record_nothing():
    moe = make_moe()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    with torch.no_grad():
        moe.train()(x)
    moe.eval()(x.requires_grad_(True)).sum().backward()
    assert float(moe.tokens_per_expert.sum()) == 0 and float(moe.aux_batches) == 0 and float(moe.aux_total) == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recomputed_forward_counts_once(use_reentrant):
    moe = make_moe().train()
    x = torch.randn(2, 6, DIM, dtype=torch.float64, requires_grad=True)
    moe(x).sum().backward()
    plain_counts, plain_aux, plain_grad = moe.tokens_per_expert.clone(), moe.aux_total.clone(), x.grad.clone()
    plain_gate = moe.router.gate.weight.grad.clone()  # LM + aux gradient, injected once
    moe.tokens_per_expert.zero_(), moe.aux_total.zero_(), moe.aux_batches.zero_()
    x.grad = None
    moe.zero_grad()
    checkpoint(moe, x, use_reentrant=use_reentrant).sum().backward()
    assert torch.equal(moe.tokens_per_expert, plain_counts) and float(moe.tokens_per_expert.sum()) == 24
    assert float(moe.aux_batches) == 1
    torch.testing.assert_close(moe.aux_total, plain_aux)
    torch.testing.assert_close(x.grad, plain_grad)
    torch.testing.assert_close(moe.router.gate.weight.grad, plain_gate)


def test_two_micro_batches_accumulate():
    moe = make_moe().train()
    for n in (4, 6):
        moe(torch.randn(1, n, DIM, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert float(moe.tokens_per_expert.sum()) == 20 and float(moe.aux_batches) == 2


# e. expert kernels ---------------------------------------------------------------------------------------------

def test_grouped_mm_matches_loop_bf16():
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        pytest.skip("grouped_mm_experts needs CUDA and torch._grouped_mm (bf16); CPU runs only the exact loop")
    torch.manual_seed(0)
    dev, h, f, e = "cuda", 64, 128, 8
    w1, w3 = (torch.randn(e, f, h, device=dev) * 0.1 for _ in range(2))
    w2 = torch.randn(e, h, f, device=dev) * 0.1
    counts = torch.tensor([5, 0, 17, 32, 0, 1, 9, 16], device=dev)
    x = torch.randn(int(counts.sum()), h, device=dev)
    ref = loop_experts(x, counts, w1, w2, w3)  # fp32 loop
    bf = [t.bfloat16() for t in (x, w1, w2, w3)]
    got = grouped_mm_experts(bf[0], counts, *bf[1:]).float()
    loop_bf = loop_experts(bf[0], counts, *bf[1:]).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, loop_bf, rtol=2e-2, atol=1e-2)


def test_loop_experts_with_empty_experts():
    torch.manual_seed(0)
    h, f, e = 8, 12, 5
    w1, w3 = torch.randn(e, f, h, dtype=torch.float64), torch.randn(e, f, h, dtype=torch.float64)
    w2 = torch.randn(e, h, f, dtype=torch.float64)
    counts = torch.tensor([0, 3, 0, 0, 2])
    x = torch.randn(5, h, dtype=torch.float64, requires_grad=True)
    out = loop_experts(x, counts, w1, w2, w3)
    want = torch.cat([swiglu(x[:3], w1[1], w2[1], w3[1]), swiglu(x[3:], w1[4], w2[4], w3[4])])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    out.sum().backward()
    assert x.grad.shape == x.shape
    # every expert empty: an empty result of the right width
    assert loop_experts(x[:0], torch.zeros(e, dtype=torch.long), w1, w2, w3).shape == (0, h)


# f. MoEBalance --------------------------------------------------------------------------------------------------

def balance_for(**moe_kw):
    model = tiny_model(**moe_kw)
    return model, MoEBalance([model], model.args, 1, torch.device("cpu"))


def test_bias_update_moves_towards_mean_load():
    model, bal = balance_for(balance="bias", bias_update_rate=0.01)
    layers = dict(bal.layers)
    assert sorted(layers) == [0, 1]
    layers[0].tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))   # mean 4
    layers[1].tokens_per_expert.copy_(torch.tensor([4.0, 4.0, 4.0, 4.0]))   # balanced
    bal.after_step(torch.tensor(True), want_metrics=False)
    torch.testing.assert_close(layers[0].expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01], dtype=torch.float64))
    assert torch.equal(layers[1].expert_bias, torch.zeros(4, dtype=torch.float64))
    for m in layers.values():  # the step's statistics are consumed
        assert float(m.tokens_per_expert.sum()) == 0 and float(m.aux_batches) == 0
    # a skipped (non-finite) step: no update
    layers[0].tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))
    bal.after_step(torch.tensor(False), want_metrics=False)
    torch.testing.assert_close(layers[0].expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01], dtype=torch.float64))


def test_bias_update_after_real_step_and_selection_follows():
    model, bal = balance_for(balance="bias", bias_update_rate=0.05)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    lm_loss(model.train(), tokens).backward()
    counts = {i: m.tokens_per_expert.clone() for i, m in bal.layers}
    assert all(float(c.sum()) == 2 * 8 * 2 for c in counts.values())
    bal.after_step(torch.tensor(True), want_metrics=False)
    for i, m in bal.layers:
        want = 0.05 * torch.sign(counts[i].mean() - counts[i])
        torch.testing.assert_close(m.expert_bias, want.double())


def test_metrics_max_load_and_dead_experts():
    model, bal = balance_for(balance="aux_loss")
    layers = dict(bal.layers)
    layers[0].tokens_per_expert.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))   # max share 0.75, 2 dead
    layers[1].tokens_per_expert.copy_(torch.tensor([2.0, 2.0, 3.0, 1.0]))   # max share 0.375, 0 dead
    layers[0].aux_total.fill_(0.5), layers[0].aux_batches.fill_(2)         # mean 0.25
    layers[1].aux_total.fill_(0.3), layers[1].aux_batches.fill_(1)
    out = bal.after_step(torch.tensor(True), want_metrics=True)
    assert out["moe/max_load"] == pytest.approx((0.75 + 0.375) / 2)
    assert out["moe/dead_experts"] == 2
    assert out["moe/aux_loss"] == pytest.approx(0.55)
    assert all(torch.equal(m.expert_bias, torch.zeros(4, dtype=torch.float64)) for m in layers.values())
    assert bal.after_step(torch.tensor(True), want_metrics=False) == {}


def test_metrics_skip_dense_layers_and_bias_has_no_aux():
    model = tiny_model(balance="bias", dense_layers=1)
    bal = MoEBalance([model], model.args, 1, torch.device("cpu"))
    assert [i for i, _ in bal.layers] == [1]
    bal.layers[0][1].tokens_per_expert.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    out = bal.after_step(torch.tensor(True), want_metrics=True)
    assert out == {"moe/max_load": 0.25, "moe/dead_experts": 0}
