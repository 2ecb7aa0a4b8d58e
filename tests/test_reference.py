"""The torch reference against hand-written per-token loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cute_moe.reference import (ACTIVATIONS, ROUTING_PRESETS, combine_reference, experts_reference,
                                gated_activation_reference, moe_reference, route_reference,
                                router_logits_reference)


def loop_route(logits, top_k, *, scoring="softmax", renormalize=False, num_groups=None, topk_groups=None,
               correction_bias=None, routed_scaling_factor=1.0):
    """Routing of one token at a time in Python floats, written from the spec."""
    weights, ids = [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            m = max(row)
            exps = [math.exp(v - m) for v in row]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        bias = [0.0] * len(row) if correction_bias is None else correction_bias.double().tolist()
        sel = [s + b for s, b in zip(scores, bias)]
        if num_groups:
            size = len(row) // num_groups
            groups = [sel[g * size:(g + 1) * size] for g in range(num_groups)]
            group_score = [sum(sorted(g, reverse=True)[:2]) if correction_bias is not None else max(g)
                           for g in groups]
            keep = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
            sel = [v if i // size in keep else -math.inf for i, v in enumerate(sel)]
        chosen = sorted(range(len(row)), key=lambda i: (-sel[i], i))[:top_k]
        w = [scores[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * routed_scaling_factor for v in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32)


def check_route(logits, top_k, **kwargs):
    weights, ids = route_reference(logits, top_k, **kwargs)
    want_w, want_ids = loop_route(logits, top_k, **kwargs)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_routing(renormalize, dtype):
    torch.manual_seed(0)
    check_route(torch.randn(64, 8).to(dtype), 2, renormalize=renormalize)
    check_route(torch.randn(32, 128).to(dtype), 8, renormalize=renormalize)


def test_deepseek_like_grouped_sigmoid_routing():
    torch.manual_seed(1)
    kwargs = dict(scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                  correction_bias=torch.randn(16) * 0.5, routed_scaling_factor=2.5)
    check_route(torch.randn(128, 16), 4, **kwargs)
    weights, ids = route_reference(torch.randn(128, 16), 4, **kwargs)
    assert torch.allclose(weights.sum(-1), torch.full((128,), 2.5))
    assert all(len({int(e) // 4 for e in row}) <= 2 for row in ids)


def test_grouped_routing_without_bias_uses_group_max():
    torch.manual_seed(2)
    check_route(torch.randn(64, 16), 3, scoring="softmax", num_groups=8, topk_groups=3)


def test_top1_sigmoid_routing():
    torch.manual_seed(3)
    logits = torch.randn(64, 16)
    check_route(logits, 1, **ROUTING_PRESETS["llama4"])
    weights, ids = route_reference(logits, 1, scoring="sigmoid")
    assert torch.equal(ids[:, 0].long(), logits.argmax(-1))
    torch.testing.assert_close(weights[:, 0], logits.max(-1).values.sigmoid())


def test_gpt_oss_topk_then_softmax_equals_softmax_renormalize():
    torch.manual_seed(4)
    logits = torch.randn(256, 32)
    top = logits.topk(4, dim=-1)
    weights, ids = route_reference(logits, 4, **ROUTING_PRESETS["gpt_oss"])
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(weights, top.values.softmax(-1))


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0, 1.0]])
    for scoring in ("softmax", "sigmoid"):
        _, ids = route_reference(logits, 3, scoring=scoring)
        assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 2]]


def test_group_ties_go_to_the_lower_group_index():
    # Four groups of two; groups 1 and 3 tie for best, groups 0 and 2 tie below them.
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 1.0, 2.0, 0.0]])
    _, ids = route_reference(logits, 2, scoring="sigmoid", num_groups=4, topk_groups=1)
    assert ids.tolist() == [[2, 3]]
    bias = torch.zeros(8)
    _, ids = route_reference(logits, 3, scoring="sigmoid", num_groups=4, topk_groups=2, correction_bias=bias)
    assert ids.tolist() == [[2, 6, 3]]


def test_correction_bias_selects_but_does_not_weight():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0])
    weights, ids = route_reference(logits, 2, scoring="sigmoid", correction_bias=bias)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, torch.tensor(2.0).sigmoid().item()]]))


def test_nan_logits_give_nan_weights():
    logits = torch.randn(3, 8)
    logits[1, 5] = float("nan")
    for scoring in ("softmax", "sigmoid"):
        weights, _ = route_reference(logits, 2, scoring=scoring, renormalize=True)
        assert weights[1].isnan().all() and not weights[[0, 2]].isnan().any()


def loop_activation(gate: float, up: float, activation: str) -> float:
    if activation == "silu":
        return gate / (1 + math.exp(-gate)) * up
    if activation == "gelu":
        return 0.5 * gate * (1 + math.erf(gate / math.sqrt(2))) * up
    gate, up = min(gate, 7.0), max(-7.0, min(up, 7.0))
    return gate / (1 + math.exp(-1.702 * gate)) * (up + 1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation(activation):
    torch.manual_seed(5)
    h = torch.randn(16, 2 * 24) * 4  # reaches past the +-7 clamps of swiglu_oai
    h[0, :3], h[0, 24:27] = torch.tensor([9.0, -9.0, 7.5]), torch.tensor([-8.0, 8.0, 0.5])
    got = gated_activation_reference(h, activation)
    gate, up = h[:, :24].double().tolist(), h[:, 24:].double().tolist()
    want = torch.tensor([[loop_activation(g, u, activation) for g, u in zip(gr, ur)]
                         for gr, ur in zip(gate, up)], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (16, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        gated_activation_reference(torch.zeros(2, 4), "relu")


def loop_experts(x, w1, w2, weights, ids, *, activation="silu", w1_bias=None, w2_bias=None,
                 apply_router_weight_on_input=False, shared_output=None):
    """Per token and slot, in float32, rounding the activation to x.dtype as the spec says."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            xt = x[t].float()
            if apply_router_weight_on_input:
                xt, w = (xt * w).to(x.dtype).float(), 1.0
            h = w1[e].float() @ xt + (0 if w1_bias is None else w1_bias[e].float())
            a = gated_activation_reference(h, activation).to(x.dtype).float()
            out[t] += w * (w2[e].float() @ a + (0 if w2_bias is None else w2_bias[e].float()))
    if shared_output is not None:
        out += shared_output.float()
    return out.to(x.dtype)


def random_layer(tokens, experts, top_k, hidden, inter, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w1 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5).to(dtype)
    weights, ids = route_reference(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    biases = {}
    if bias:
        biases = dict(w1_bias=torch.randn(experts, 2 * inter, generator=g).to(dtype),
                      w2_bias=torch.randn(experts, hidden, generator=g).to(dtype))
    return x, w1, w2, weights, ids, biases


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 9), experts=st.integers(1, 6), hidden=st.integers(1, 20),
       inter=st.integers(1, 20), data=st.data())
def test_experts_match_loop_fp32(tokens, experts, hidden, inter, data):
    top_k = data.draw(st.integers(1, experts))
    activation = data.draw(st.sampled_from(ACTIVATIONS))
    bias = data.draw(st.booleans())
    x, w1, w2, weights, ids, biases = random_layer(tokens, experts, top_k, hidden, inter, bias=bias)
    got = experts_reference(x, w1, w2, weights, ids, activation=activation, **biases)
    want = loop_experts(x, w1, w2, weights, ids, activation=activation, **biases)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_match_loop_low_precision(dtype):
    x, w1, w2, weights, ids, biases = random_layer(24, 8, 2, 64, 96, dtype=dtype, bias=True)
    shared = torch.randn(24, 64).to(dtype)
    got = experts_reference(x, w1, w2, weights, ids, shared_output=shared, **biases)
    want = loop_experts(x, w1, w2, weights, ids, shared_output=shared, **biases)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_router_weight_on_input():
    x, w1, w2, _, _, _ = random_layer(16, 4, 1, 32, 48, dtype=torch.bfloat16)
    weights, ids = route_reference(torch.randn(16, 4), 1, scoring="sigmoid")
    got = experts_reference(x, w1, w2, weights, ids, apply_router_weight_on_input=True)
    want = loop_experts(x, w1, w2, weights, ids, apply_router_weight_on_input=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    on_output = experts_reference(x, w1, w2, weights, ids)
    assert not torch.allclose(got.float(), on_output.float(), atol=1e-2)  # silu is not linear


def test_experts_realistic_size_is_fast_enough():
    x, w1, w2, weights, ids, _ = random_layer(512, 16, 4, 512, 768, dtype=torch.bfloat16)
    out = experts_reference(x, w1, w2, weights, ids)
    assert out.shape == (512, 512) and out.isfinite().all()


def test_combine():
    torch.manual_seed(6)
    y, w, shared = torch.randn(5, 3, 7).bfloat16(), torch.rand(5, 3), torch.randn(5, 7)
    want = torch.stack([sum(w[t, j] * y[t, j].float() for j in range(3)) + shared[t] for t in range(5)])
    got = combine_reference(y, w, shared)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16())


def test_empty_and_nan():
    x, w1, w2, weights, ids, _ = random_layer(6, 4, 2, 8, 8)
    assert experts_reference(x[:0], w1, w2, weights[:0], ids[:0]).shape == (0, 8)
    x[2, 3] = float("nan")
    out = experts_reference(x, w1, w2, weights, ids)
    assert out[2].isnan().all() and out[[0, 1, 3, 4, 5]].isfinite().all()


def test_moe_reference_composes_router_route_and_experts():
    x, w1, w2, _, _, _ = random_layer(10, 8, 2, 16, 24)
    router = torch.randn(8, 16)
    logits = router_logits_reference(x, router)
    torch.testing.assert_close(logits, x @ router.T)
    weights, ids = route_reference(logits, 2, renormalize=True)
    torch.testing.assert_close(moe_reference(x, router, w1, w2, 2, renormalize=True, activation="gelu"),
                               experts_reference(x, w1, w2, weights, ids, activation="gelu"))


def test_router_logits_off_the_gpu_is_the_reference():
    """cute_moe.routing.router_logits runs its kernel only for one 16-bit CUDA token; anything else
    (here: CPU, several tokens) is router_logits_reference."""
    from cute_moe.routing import router_logits

    x = torch.randn(3, 64).bfloat16()
    w = torch.randn(8, 64).bfloat16()
    assert torch.equal(router_logits(x, w), router_logits_reference(x, w))
    assert torch.equal(router_logits(x[:1], w), router_logits_reference(x[:1], w))
