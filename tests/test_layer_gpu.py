"""The whole MoE layer on the cute backend vs the float32 reference (GPU)."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe.reference import experts_reference

pytestmark = pytest.mark.gpu

needs_sm90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9), reason="needs an sm_90 GPU"
)


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _layer(e, h, i, bias=False):
    w1 = (torch.randn(e, 2 * i, h, device="cuda") * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, device="cuda") * i**-0.5).to(torch.bfloat16)
    b1 = torch.randn(e, 2 * i, device="cuda").to(torch.bfloat16) if bias else None
    b2 = torch.randn(e, h, device="cuda").to(torch.bfloat16) if bias else None
    return w1, w2, b1, b2


@needs_sm90
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_fused_moe_matches_reference(tokens, activation):
    e, k, h, i = 16, 4, 256, 128
    w1, w2, b1, b2 = _layer(e, h, i, bias=activation == "swiglu_oai")
    x = torch.randn(tokens, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(tokens, e, device="cuda"), k, renormalize=True)
    out = torch.full((tokens, h), float("nan"), device="cuda", dtype=torch.bfloat16)
    cute_moe.fused_moe(x, w1, w2, weights, ids, activation=activation, w1_bias=b1, w2_bias=b2,
                       out=out, backend="cute")
    assert cute_moe.last_backend() == "cute"
    ref = experts_reference(x, w1, w2, weights, ids, activation=activation, w1_bias=b1, w2_bias=b2)
    assert rel_err(out, ref) < 1e-2


@needs_sm90
def test_skewed_routing_one_hot_expert():
    e, k, h, i = 8, 2, 128, 64
    w1, w2, _, _ = _layer(e, h, i)
    x = torch.randn(257, h, device="cuda").to(torch.bfloat16)
    ids = torch.stack([torch.full((257,), 3), torch.full((257,), 5)], 1).int().cuda()
    weights = torch.rand(257, k, device="cuda")
    out = cute_moe.fused_moe(x, w1, w2, weights, ids, backend="cute")
    assert rel_err(out, experts_reference(x, w1, w2, weights, ids, activation="silu")) < 1e-2


@needs_sm90
def test_moe_cupy_in_cupy_out():
    cp = pytest.importorskip("cupy")
    e, k, h, i = 8, 2, 128, 64
    w1, w2, _, _ = _layer(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    x = torch.randn(33, h, device="cuda").to(torch.bfloat16)
    out = cute_moe.moe(cp.from_dlpack(x), cp.from_dlpack(router), cp.from_dlpack(w1), cp.from_dlpack(w2), k,
                       renormalize=True, backend="cute")
    assert isinstance(out, cp.ndarray)
    ref = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")
    assert rel_err(torch.from_dlpack(out), ref) < 1e-2


@needs_sm90
def test_cuda_graph_replay_with_new_routing():
    e, k, h, i, t = 32, 4, 256, 128, 96
    w1, w2, _, _ = _layer(e, h, i)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    logits = torch.randn(t, e, device="cuda")
    weights, ids = cute_moe.route(logits, k, renormalize=True)
    out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)
    cute_moe.fused_moe(x, w1, w2, weights, ids, out=out, backend="cute")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cute_moe.fused_moe(x, w1, w2, weights, ids, out=out, backend="cute")
    for skew in (0.0, 5.0):
        new_w, new_ids = cute_moe.route(torch.randn(t, e, device="cuda") + skew * torch.arange(e, device="cuda") / e,
                                        k, renormalize=True)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        x.copy_(torch.randn(t, h, device="cuda"))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, experts_reference(x, w1, w2, weights, ids, activation="silu")) < 1e-2


@needs_sm90
def test_nn_moe_cuda_graphs_match_eager():
    """cuda_graphs(): per-T graphs replayed with new inputs give the eager result bitwise (same
    kernels, deterministic combine); larger T runs eagerly; replacing weights rebuilds the graphs."""
    torch.manual_seed(0)
    layer = cute_moe.nn.MoE(256, 128, 8, 2, renormalize=True, device="cuda")
    eager = cute_moe.nn.MoE.from_weights(layer.router_weight, layer.w1, layer.w2, 2, renormalize=True)
    layer.cuda_graphs(max_tokens=16)
    for tokens in (1, 5, 16, 5, 1):
        x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
        shared = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
        assert torch.equal(layer(x), eager(x))
        assert torch.equal(layer(x, shared), eager(x, shared))
    assert sorted(k[0] for k in layer._graphs) == [1, 1, 5, 5, 16, 16]
    x = torch.randn(17, 256, device="cuda").to(torch.bfloat16)
    assert torch.equal(layer(x), eager(x)) and all(k[0] != 17 for k in layer._graphs)
    layer.quantize_("per_token")
    eager.quantize_("per_token")
    x = torch.randn(4, 256, device="cuda").to(torch.bfloat16)
    assert torch.equal(layer(x), eager(x)) and [k[0] for k in layer._graphs] == [4]
    assert cute_moe.last_backend() == "cute"
