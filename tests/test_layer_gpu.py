"""The whole MoE layer on the cute backend vs the float32 reference (GPU)."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe.reference import experts_reference
from gpu_checks import needs_sm90, rel_err

pytestmark = pytest.mark.gpu


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


def _graphed_pair(max_tokens=16, **graph_kwargs):
    """(layer with cuda_graphs, eager layer on the same weights)."""
    torch.manual_seed(0)
    layer = cute_moe.nn.MoE(256, 128, 8, 2, renormalize=True, device="cuda")
    eager = cute_moe.nn.MoE.from_weights(layer.router_weight, layer.w1, layer.w2, 2, renormalize=True)
    return layer.cuda_graphs(max_tokens, **graph_kwargs), eager


def _bf16(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


@needs_sm90
@pytest.mark.parametrize("driver", [True, False])
def test_nn_moe_cuda_graphs_new_inputs_every_call_bitwise(driver, monkeypatch):
    """Replays with new x (and shared_output) values on every call give the eager result bitwise, through
    the driver (cuMemcpyDtoDAsync + cuGraphLaunch) and through the copy_/graph.replay() fallback."""
    from cute_moe import _nvrtc

    if not driver:
        monkeypatch.setattr(_nvrtc, "graph_launch", None)
    layer, eager = _graphed_pair()
    for shape in [(1, 256)] * 4 + [(7, 256)] * 4 + [(2, 3, 256)] * 3:
        x, shared = _bf16(*shape), _bf16(*shape)
        assert torch.equal(layer(x), eager(x))
        assert torch.equal(layer(x, shared), eager(x, shared))
        shared32 = torch.randn(*shape, device="cuda")  # float32 addend: a graph of its own
        assert torch.equal(layer(x, shared32), eager(x, shared32))
    graphs = layer._graphs.values()
    assert sorted(k[0] for k in layer._graphs) == [1] * 3 + [6] * 3 + [7] * 3
    want_driver = driver and _nvrtc.memcpy_dtod is not None and hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec")
    assert all(bool(g.exec_handle) == want_driver for g in graphs)


@needs_sm90
def test_nn_moe_cuda_graphs_non_contiguous_inputs():
    """Non-contiguous x / shared_output (column slices of wider tensors) take Tensor.copy_ and stay exact."""
    layer, eager = _graphed_pair()
    for tokens in (3, 3, 5):
        x = _bf16(tokens, 512)[:, 128:384]
        shared = _bf16(tokens, 384)[:, :256]
        assert not x.is_contiguous() and not shared.is_contiguous()
        want = eager(x.contiguous(), shared.contiguous())
        assert torch.equal(layer(x), eager(x.contiguous()))
        assert torch.equal(layer(x, shared), want)
        assert torch.equal(layer(x.contiguous(), shared), want)
        assert torch.equal(layer(x, shared.contiguous()), want)
    assert all(g.x.is_contiguous() for g in layer._graphs.values())


@needs_sm90
def test_nn_moe_cuda_graphs_copy_output_false_returns_the_static_buffer():
    """copy_output=False: the returned tensor is the graph's output buffer (same address on every call
    with the same key), holding the right values until the next such call overwrites it."""
    layer, eager = _graphed_pair(copy_output=False)
    x1, x2, shared = _bf16(4, 256), _bf16(4, 256), _bf16(4, 256)
    y1 = layer(x1)
    assert torch.equal(y1, eager(x1))
    kept = y1.clone()
    y2 = layer(x2)
    assert y2.data_ptr() == y1.data_ptr() and torch.equal(y2, eager(x2))
    assert torch.equal(y1, y2) and not torch.equal(kept, y2)  # overwritten, as documented
    y3 = layer(x1, shared)  # another key: another graph, another buffer
    assert torch.equal(y3, eager(x1, shared)) and y3.data_ptr() != y1.data_ptr()
    y4 = layer(x2, shared)
    assert y4.data_ptr() == y3.data_ptr() and torch.equal(y4, eager(x2, shared))
    x3 = _bf16(2, 2, 256)
    y5 = layer(x3)
    assert y5.shape == x3.shape and torch.equal(y5, eager(x3)) and y5.data_ptr() == y1.data_ptr()


@needs_sm90
@pytest.mark.parametrize("copy_output", [True, False])
def test_nn_moe_cuda_graphs_on_a_side_stream(copy_output):
    """Calls on a non-default stream (capture and replays) are ordered on that stream: correct after a
    synchronize; the same graphs then replay on the default stream."""
    layer, eager = _graphed_pair(copy_output=copy_output)
    tokens = (2, 2, 9, 2, 9, 9)
    xs, shared = [_bf16(t, 256) for t in tokens], [_bf16(t, 256) for t in tokens]
    want = [eager(x, s) for x, s in zip(xs, shared)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [layer(x, s).clone() for x, s in zip(xs, shared)]  # clone: the buffer is reused when not copied
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(layer(xs[2], shared[2]), want[2])
