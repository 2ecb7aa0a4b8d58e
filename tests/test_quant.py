"""fp8 e4m3 quantization emulation: layouts, error bound, ragged blocks, and the quant= reference path.

Bound tested: e4m3 keeps 3 mantissa bits, so rounding a scale-normalized value v = x / scale in the
normal range (|v| >= 2^-6) errs by at most half an ulp, 2^-4 |v|; below it (subnormals, spacing
2^-9) by at most 2^-10. Hence |dequant(quant(x)) - x| <= 2^-4 |x| + 2^-10 scale, per element.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cute_moe.quant import (FP8_DTYPE, FP8_MAX, QuantConfig, QuantizedWeights, dequantize_blockwise_act,
                            dequantize_blockwise_weight, dequantize_per_channel, dequantize_per_expert,
                            dequantize_per_tensor, dequantize_per_token, dequantize_weight,
                            fake_quantize_act, quantize_blockwise_act, quantize_blockwise_weight,
                            quantize_per_channel, quantize_per_expert, quantize_per_tensor,
                            quantize_per_token, quantize_weights)
from cute_moe.reference import experts_reference, gated_activation_reference, route_reference


def per_element(scale: torch.Tensor, shape, block: int) -> torch.Tensor:
    """Scale of every element: repeat blocks along the trailing dims the scale is blocked in."""
    s = scale
    for dim in range(s.dim()):
        if s.shape[dim] not in (1, shape[dim]):
            s = s.repeat_interleave(block, dim)[(slice(None),) * dim + (slice(0, shape[dim]),)]
    return s.expand(shape)


def assert_within_e4m3_bound(x, deq, scale_el):
    bound = 2.0 ** -4 * x.abs() + 2.0 ** -10 * scale_el + 1e-30
    assert (deq - x).abs().le(bound * (1 + 1e-6)).all(), float(((deq - x).abs() / bound).max())


ACT = {
    "per_tensor": (quantize_per_tensor, dequantize_per_tensor, lambda m, k: ()),
    "per_token": (quantize_per_token, dequantize_per_token, lambda m, k: (m, 1)),
    "blockwise": (quantize_blockwise_act, dequantize_blockwise_act, lambda m, k: (m, -(-k // 128))),
}
WEIGHT = {
    "per_tensor": (quantize_per_expert, dequantize_per_expert, lambda e, n, k: (e, 1, 1)),
    "per_token": (quantize_per_channel, dequantize_per_channel, lambda e, n, k: (e, n, 1)),
    "blockwise": (quantize_blockwise_weight, dequantize_blockwise_weight,
                  lambda e, n, k: (e, -(-n // 128), -(-k // 128))),
}


@settings(max_examples=20, deadline=None)
@given(mode=st.sampled_from(sorted(ACT)), m=st.integers(1, 9), k=st.sampled_from([1, 7, 128, 200, 300, 384]),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]))
def test_activation_roundtrip(mode, m, k, magnitude):
    quantize, dequantize, scale_shape = ACT[mode]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)) * magnitude
    x[0, -1] = 0.0
    q, scale = quantize(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(m, k)
    deq = dequantize(q, scale)
    assert_within_e4m3_bound(x, deq, per_element(scale, x.shape, 128))
    if x.abs().amax() > 0:
        assert q.float().abs().amax() == FP8_MAX  # the largest element maps to the top of the range
    torch.testing.assert_close(fake_quantize_act(x, mode), deq, rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(mode=st.sampled_from(sorted(WEIGHT)), e=st.integers(1, 3), n=st.sampled_from([5, 128, 200]),
       k=st.sampled_from([3, 128, 300]))
def test_weight_roundtrip(mode, e, n, k):
    quantize, dequantize, scale_shape = WEIGHT[mode]
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(e * n * k)) * 0.05
    q, scale = quantize(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(e, n, k)
    deq = dequantize(q, scale)
    assert_within_e4m3_bound(w, deq, per_element(scale, w.shape, 128))
    torch.testing.assert_close(dequantize_weight(q, scale, mode), deq, rtol=0, atol=0)


def test_blockwise_scales_by_hand():
    """scale_inv of each 128x128 tile (ragged edges included) is that tile's amax / 448."""
    w = torch.randn(2, 200, 300)
    _, scale_inv = quantize_blockwise_weight(w)
    for e in range(2):
        for i, r in enumerate(range(0, 200, 128)):
            for j, c in enumerate(range(0, 300, 128)):
                assert scale_inv[e, i, j] == w[e, r:r + 128, c:c + 128].abs().max() / FP8_MAX
    x = torch.randn(3, 300)
    _, scale = quantize_blockwise_act(x)
    for j, c in enumerate(range(0, 300, 128)):
        torch.testing.assert_close(scale[:, j], x[:, c:c + 128].abs().amax(-1) / FP8_MAX)


@pytest.mark.parametrize("mode", sorted(ACT))
def test_zeros_do_not_make_nan(mode):
    q, scale = ACT[mode][0](torch.zeros(4, 130))
    assert (scale > 0).all() and q.float().eq(0).all()
    assert ACT[mode][1](q, scale).eq(0).all()
    wq, wscale = WEIGHT[mode][0](torch.zeros(2, 130, 5))
    assert (wscale > 0).all() and WEIGHT[mode][1](wq, wscale).eq(0).all()


def test_per_tensor_of_empty():
    q, scale = quantize_per_tensor(torch.zeros(0, 8))
    assert q.shape == (0, 8) and scale.shape == () and scale > 0


def test_config():
    assert QuantConfig("blockwise").dtype == "e4m3"
    with pytest.raises(ValueError, match="mode"):
        QuantConfig("int4")
    with pytest.raises(ValueError, match="dtype"):
        QuantConfig("per_token", dtype="e5m2")
    with pytest.raises(ValueError, match="mode"):
        quantize_weights(torch.zeros(1, 2, 2), torch.zeros(1, 2, 1), "nope")


def loop_quant_experts(x, qw: QuantizedWeights, weights, ids):
    """The quant= semantics step by step: fake-quantized GEMM inputs, dequantized weights."""
    w1 = dequantize_weight(qw.w1_q, qw.w1_scale, qw.mode)
    w2 = dequantize_weight(qw.w2_q, qw.w2_scale, qw.mode)
    x_q = fake_quantize_act(x, qw.mode)  # every token appears, so whole-x scales are the rows' scales
    slots = [(t, j, int(ids[t, j])) for t in range(x.shape[0]) for j in range(ids.shape[1])]
    acts = torch.stack([gated_activation_reference(w1[e] @ x_q[t], "silu") for t, _, e in slots])
    acts = fake_quantize_act(acts.to(x.dtype).float(), qw.mode)
    out = torch.zeros(x.shape)
    for (t, j, e), a in zip(slots, acts):
        out[t] += weights[t, j] * (w2[e] @ a)
    return out.to(x.dtype)


@pytest.mark.parametrize("mode", sorted(ACT))
def test_quantized_experts_reference(mode):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 200, generator=g).bfloat16()
    w1 = (torch.randn(4, 2 * 136, 200, generator=g) * 200 ** -0.5).bfloat16()
    w2 = (torch.randn(4, 200, 136, generator=g) * 136 ** -0.5).bfloat16()
    weights, ids = route_reference(torch.randn(12, 4, generator=g), 2, renormalize=True)
    qw = quantize_weights(w1, w2, QuantConfig(mode))
    got = experts_reference(x, None, None, weights, ids, quant=qw)
    torch.testing.assert_close(got, loop_quant_experts(x, qw, weights, ids), rtol=2e-2, atol=2e-2)
    exact = experts_reference(x, w1, w2, weights, ids).float()
    assert (got.float() - exact).norm() / exact.norm() < 0.1
