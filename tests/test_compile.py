"""torch.compile(fullgraph=True) through the cute_moe custom ops (cute_moe/ops.py)."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe.reference import experts_reference


def _compiled(fn, backend, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_nn_moe_compiles_and_matches_eager(backend):
    torch.manual_seed(0)
    layer = cute_moe.nn.MoE(64, 32, 8, 2, renormalize=True, bias=True, correction_bias=True,
                            num_groups=4, topk_groups=2, scoring="sigmoid", dtype=torch.float32)
    x, shared = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    ref = layer(x, shared)
    c = _compiled(layer, backend)
    torch.testing.assert_close(c(x, shared), ref, rtol=0, atol=0)
    assert cute_moe.last_backend() == "reference"
    x2 = torch.randn(3, 64)
    torch.testing.assert_close(c(x2), layer(x2), rtol=0, atol=0)


def test_function_calling_route_and_fused_moe_compiles():
    torch.manual_seed(1)
    e, k, h, i = 8, 2, 64, 32
    w1, w2 = torch.randn(e, 2 * i, h) / 8, torch.randn(e, h, i) / 6
    b1, b2 = torch.randn(e, 2 * i), torch.randn(e, h)

    def f(x, logits, shared, out):
        weights, ids = cute_moe.route(logits, k, renormalize=True)
        y = cute_moe.fused_moe(x, w1, w2, weights, ids, activation="gelu", w1_bias=b1, w2_bias=b2,
                               shared_output=shared)
        cute_moe.fused_moe(x, w1, w2, weights, ids, activation="swiglu_oai", out=out)
        return y * 2

    x, logits, shared = torch.randn(6, h), torch.randn(6, e), torch.randn(6, h)
    out_ref, out = torch.empty(6, h), torch.empty(6, h)
    ref = f(x, logits, shared, out_ref)
    got = _compiled(f, "aot_eager")(x, logits, shared, out)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)


def test_dynamic_token_count_and_empty_input():
    layer = cute_moe.nn.MoE(32, 16, 4, 2, dtype=torch.float32)
    c = _compiled(layer, "aot_eager", dynamic=True)
    for t in (3, 9, 0):
        x = torch.randn(t, 32)
        torch.testing.assert_close(c(x), layer(x), rtol=0, atol=0)


def test_quantized_layer_compiles():
    torch.manual_seed(2)
    layer = cute_moe.nn.MoE(128, 128, 4, 2, dtype=torch.bfloat16).quantize_("blockwise")
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(_compiled(layer, "aot_eager")(x), layer(x), rtol=0, atol=0)


def test_invalid_arguments_raise_at_trace_time():
    layer = cute_moe.nn.MoE(64, 32, 8, 2, dtype=torch.float32)
    f = _compiled(lambda x, w, ids: cute_moe.fused_moe(x, layer.w1, layer.w2, w, ids), "aot_eager")
    with pytest.raises(Exception, match="topk_weights: expected shape"):
        f(torch.randn(4, 64), torch.rand(4, 2), torch.zeros(4, 3, dtype=torch.int32))


def test_ops_are_registered_with_fake_kernels():
    x = torch.empty(5, 16, device="meta")
    w1, w2 = torch.empty(4, 16, 16, device="meta"), torch.empty(4, 16, 8, device="meta")
    w, ids = torch.ops.cute_moe.route(torch.empty(5, 4, device="meta"), 2, "softmax", True, None, None, None,
                                      1.0, "auto")
    assert (w.shape, w.dtype, ids.dtype) == ((5, 2), torch.float32, torch.int32)
    y = torch.ops.cute_moe.fused_moe(x, w1, w2, w, ids, "silu", None, None, None, None, None, None, None, False,
                                     None, "auto")
    assert y.shape == (5, 16) and y.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs an sm_90 GPU")
def test_inductor_compile_on_cuda_matches_reference():
    torch.manual_seed(0)
    e, k, h, i = 16, 4, 256, 128
    layer = cute_moe.nn.MoE(h, i, e, k, renormalize=True, bias=True, activation="swiglu_oai", device="cuda")
    x = torch.randn(3, 37, h, device="cuda", dtype=torch.bfloat16)
    shared = torch.randn(3, 37, h, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    c = torch.compile(layer, fullgraph=True)
    out = c(x, shared)
    assert cute_moe.last_backend() == "cute"
    flat = x.reshape(-1, h)
    weights, ids = cute_moe.route(flat.float() @ layer.router_weight.T, k, renormalize=True, backend="reference")
    ref = experts_reference(flat, layer.w1, layer.w2, weights, ids, activation="swiglu_oai", w1_bias=layer.w1_bias,
                            w2_bias=layer.w2_bias, shared_output=shared.reshape(-1, h)).reshape(x.shape)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs an sm_90 GPU")
def test_reduce_overhead_cuda_graphs_on_cuda():
    torch.manual_seed(0)
    h = 256
    layer = cute_moe.nn.MoE(h, 128, 16, 4, renormalize=True, device="cuda")
    x = torch.randn(64, h, device="cuda", dtype=torch.bfloat16)
    shared = torch.randn(64, h, device="cuda", dtype=torch.bfloat16)
    ref = cute_moe.nn.MoE.from_weights(layer.router_weight, layer.w1, layer.w2, 4, renormalize=True,
                                       backend="reference")(x, shared)
    torch._dynamo.reset()
    c2 = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out2 = c2(x, shared)
    assert ((out2.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
