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
from cute_moe.plan import plan_buffer_ints
from cute_moe.workspace import Workspace


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


@pytest.mark.parametrize("inter", [128, 160, 208, 2880])
def test_blockwise_gated_weight_blocks_each_half(inter):
    """w1's gate and up halves get their own 128x128 blocks ([E, 2*ceil(I/128), ceil(H/128)]): no block
    straddles the two, the layout equals whole-matrix blocking when I % 128 == 0, and dequantizing
    with gated=True inverts it (I=208: both layouts have 4 block rows, so the shape cannot tell them
    apart; the fp8 reference once dequantized such a w1 as one matrix)."""
    from cute_moe.quant import quantize_blockwise_gated_weight, quantize_weights, weight_scale_blocks

    hidden = 200
    w1 = torch.randn(2, 2 * inter, hidden)
    q, scale = quantize_blockwise_gated_weight(w1)
    nb = -(-inter // 128)
    assert scale.shape == (2, 2 * nb, 2) and weight_scale_blocks(2 * inter, True) == 2 * nb
    for e in range(2):
        for half in range(2):
            for i, r in enumerate(range(0, inter, 128)):
                rows = slice(half * inter + r, half * inter + min(r + 128, inter))
                assert scale[e, half * nb + i, 0] == w1[e, rows, :128].abs().max() / FP8_MAX
    if inter % 128 == 0:
        q_whole, scale_whole = quantize_blockwise_weight(w1)
        assert torch.equal(scale, scale_whole) and torch.equal(q.view(torch.uint8), q_whole.view(torch.uint8))
    deq = dequantize_blockwise_weight(q, scale, gated=True)
    if weight_scale_blocks(2 * inter, False) != weight_scale_blocks(2 * inter, True):
        torch.testing.assert_close(dequantize_blockwise_weight(q, scale), deq, rtol=0, atol=0)
    for half in range(2):
        rows = slice(half * inter, (half + 1) * inter)
        torch.testing.assert_close(deq[:, rows], dequantize_blockwise_weight(q[:, rows], scale[:, half * nb:(half + 1) * nb]),
                                   rtol=0, atol=0)
    assert ((deq - w1).norm() / w1.norm()).item() < 0.05
    qw = quantize_weights(w1, torch.randn(2, hidden, inter), "blockwise")
    assert torch.equal(qw.w1_scale, scale) and qw.w2_scale.shape == (2, 2, nb)
    torch.testing.assert_close(dequantize_weight(qw.w1_q, qw.w1_scale, "blockwise", gated=True), deq, rtol=0, atol=0)
    from cute_moe.reference import _expert_weights

    w1_of, _, _ = _expert_weights(None, None, qw)
    torch.testing.assert_close(w1_of(1), deq[1], rtol=0, atol=0)


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


def _fp8_layer_kwargs(mode, hidden=256, inter=128, dtype=torch.bfloat16, **over):
    w1 = torch.randn(4, 2 * inter, hidden) * hidden ** -0.5
    w2 = torch.randn(4, hidden, inter) * inter ** -0.5
    kw = dict(x=torch.randn(8, hidden).to(dtype), w1=None, w2=None, quant=quantize_weights(w1, w2, mode),
              apply_router_weight_on_input=False)
    return kw | over


@pytest.mark.parametrize("mode", sorted(ACT))
def test_cute_layer_takes_fp8(monkeypatch, mode):
    """The cute backend's dispatch accepts quant= on sm_90 (arch faked: CPU tensors carry the metadata)."""
    from cute_moe import layer

    monkeypatch.setattr(layer, "_cuda_arch", lambda t: (9, 0))
    assert layer.unsupported_reason("fused_moe", **_fp8_layer_kwargs(mode)) is None
    assert layer.unsupported_reason("fused_moe", **_fp8_layer_kwargs(mode, dtype=torch.float16)) is None
    assert layer.unsupported_reason("fused_moe", **_fp8_layer_kwargs(mode, hidden=320, inter=128)) is None


def test_cute_layer_fp8_reasons(monkeypatch):
    from cute_moe import layer

    monkeypatch.setattr(layer, "_cuda_arch", lambda t: (9, 0))

    def reason(mode, **kw):
        return layer.unsupported_reason("fused_moe", **_fp8_layer_kwargs(mode, **kw))

    assert reason("blockwise", inter=144) is None  # gate/up blocked per half: any I % 16 == 0
    assert reason("per_token", inter=144) is None
    assert "multiples of 16" in reason("per_tensor", hidden=264)
    assert "multiples of 16" in reason("per_token", inter=136)
    assert "bfloat16 or float16" in reason("per_token", dtype=torch.float32)
    kw = _fp8_layer_kwargs("per_token")
    assert "contiguous" in layer.unsupported_reason("fused_moe", **kw | dict(x=torch.randn(256, 8).T.bfloat16()))
    assert "apply_router_weight_on_input" in reason("per_token", apply_router_weight_on_input=True)
    monkeypatch.setattr(layer, "_cuda_arch", lambda t: (10, 0))
    assert "sm_100" in reason("per_token")


@pytest.mark.parametrize("mode, want", [("per_tensor", (3,)), ("per_token", (3, 200)), ("blockwise", (3, 2, 3))])
def test_gemm_weight_scale_layouts(mode, want):
    """Weight scales in grouped_gemm's b_scale layout: views of contiguous scales, else one cached copy."""
    from cute_moe.layer import gemm_weight_scale

    _, scale = WEIGHT[mode][0](torch.randn(3, 200, 300))
    got = gemm_weight_scale(scale, mode)
    assert tuple(got.shape) == want and got.is_contiguous() and got.data_ptr() == scale.data_ptr()
    strided = scale.transpose(0, -1).contiguous().transpose(0, -1)  # same values, experts not outermost
    if strided.is_contiguous():
        return
    first = gemm_weight_scale(strided, mode)
    assert first.is_contiguous() and torch.equal(first.reshape(scale.shape), scale)
    assert gemm_weight_scale(strided, mode) is first  # made once, reused
    strided.mul_(2)  # modified in place: re-made
    again = gemm_weight_scale(strided, mode)
    assert again is not first and torch.equal(again.reshape(scale.shape), 2 * scale)


def test_tensor_memo_is_keyed_by_identity_and_version():
    from cute_moe.quant import TensorMemo

    memo, t = TensorMemo(), torch.ones(4)
    memo.put(t, "checked")
    assert memo.get(t) == "checked"
    assert memo.get(t.view(4)) is None  # another object (even over the same memory)
    t.add_(1)
    assert memo.get(t) is None
    memo.put(t, "again")
    del t
    assert not memo._entries  # dropped with the tensor


def test_weight_scale_check_skips_fake_and_meta_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cute_moe.quant import check_scale_values

    assert check_scale_values("s", torch.full((2, 1, 1), float("nan"), device="meta")) is False
    with FakeTensorMode():
        assert check_scale_values("s", torch.full((2, 1, 1), float("nan"))) is False
    assert check_scale_values("s", torch.ones(2, 1, 1)) is True
    with pytest.raises(ValueError, match=r"^s: expected finite scales > 0, got -1\.0 at index \[1, 0, 0\]"):
        check_scale_values("s", torch.tensor([1.0, -1.0]).reshape(2, 1, 1))


class _KernelEmulation:
    """The cute layer's kernels replaced by torch on the CPU, to check the fp8 glue of cute_moe.layer
    (activation scale layouts, weight scale re-layout, dtypes) against the reference without a GPU.
    The emulated grouped GEMM validates its scale arguments with the real grouped_gemm shape checks."""

    def __init__(self, monkeypatch):
        from cute_moe import layer
        from cute_moe.plan import plan_reference

        for name in ("permute_fp8", "permute_fp8_per_tensor", "quantize_fp8", "grouped_gemm", "combine"):
            monkeypatch.setattr(layer, name, getattr(self, name))
        monkeypatch.setattr(layer, "make_plan", self.make_plan)
        self._plan_reference = plan_reference
        self.calls = []

    def make_plan(self, ids, num_experts, *, buffer=None):
        plan = self._plan_reference(ids, num_experts)
        if buffer is not None:  # the workspace's int32 buffer must hold the plan
            assert buffer.dtype == torch.int32 and buffer.numel() >= plan_buffer_ints(ids.numel(), num_experts)
        return plan

    @staticmethod
    def _store(value, dest):
        """``value`` written into the layer-provided destination ``dest`` (a workspace view), if any."""
        if dest is None:
            return value
        assert dest.shape == value.shape and dest.dtype == value.dtype, (dest.shape, value.shape, dest.dtype)
        return dest.copy_(value)

    def _store_scale(self, scale, dest, scaling):
        if dest is None:
            return scale
        if scaling == "tensor":  # a [2] scratch: [amax, scale]; the kernels hand back its [1:] view
            assert dest.shape == (2,)
            dest[1:] = scale
            return dest[1:]
        return self._store(scale, dest)

    @staticmethod
    def _rows(x, plan):
        return x[plan.row_src.long() // plan.top_k]

    @staticmethod
    def _quantize(rows, scaling):
        if scaling == "token":
            q, s = quantize_per_token(rows)
            return q, s.reshape(-1)
        if scaling == "block":
            q, s = quantize_blockwise_act(rows)
            return q, s.T.contiguous()
        q, s = quantize_per_tensor(rows)
        return q, s.reshape(1)

    def permute_fp8(self, x, plan, *, scaling, out=None, out_scale=None):
        self.calls.append(("permute_fp8", scaling))
        q, s = self._quantize(self._rows(x, plan), scaling)
        return self._store(q, out), self._store_scale(s, out_scale, scaling)

    def permute_fp8_per_tensor(self, x, plan, *, out=None, out_scale=None):
        self.calls.append(("permute_fp8_per_tensor",))
        q, s = self._quantize(x, "tensor")
        q = self._rows(q.view(torch.uint8), plan).view(FP8_DTYPE)
        return self._store(q, out), self._store_scale(s, out_scale, "tensor")

    def quantize_fp8(self, h, *, scaling, num_rows, out=None, out_scale=None):
        self.calls.append(("quantize_fp8", scaling))
        assert h.dtype in (torch.bfloat16, torch.float16) and int(num_rows[0]) == h.shape[0]
        q, s = self._quantize(h, scaling)
        return self._store(q, out), self._store_scale(s, out_scale, scaling)

    def grouped_gemm(self, a, b, cu, *, activation="none", bias=None, a_scale=None, b_scale=None, out_dtype=None,
                     out=None, segments_ready=False):
        from cute_moe.gemm.interface import _scale_mode

        num_e, n, k = b.shape
        mode = _scale_mode(True, a_scale, b_scale, a.shape[0], num_e, n, k, activation != "none")
        self.calls.append(("grouped_gemm", mode, activation, out_dtype))
        if mode == "tensor":
            da, db = a.float() * a_scale, b.float() * b_scale[:, None, None]
        elif mode == "token":
            da, db = a.float() * a_scale[:, None], b.float() * b_scale[:, :, None]
        else:
            da, db = dequantize_blockwise_act(a, a_scale.T), dequantize_blockwise_weight(b, b_scale)
        outs, cu = [], cu.tolist()
        for e in range(num_e):
            h = da[cu[e]:cu[e + 1]] @ db[e].T
            if bias is not None:
                h = h + bias[e].bfloat16().float()
            outs.append(gated_activation_reference(h, activation) if activation != "none" else h)
        return self._store(torch.cat(outs).to(out_dtype), out)

    def combine(self, y, plan, weights, *, addend=None, out=None):
        got = (y.float()[plan.token_rows.long()] * weights[..., None]).sum(1)
        if addend is not None:
            got = got + addend.float()
        got = got.to(y.dtype)
        return got if out is None else out.copy_(got)


@pytest.mark.parametrize("mode", sorted(ACT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("workspace", [False, True])
def test_fp8_layer_glue_on_emulated_kernels(monkeypatch, mode, dtype, workspace):
    from cute_moe import layer

    kernels = _KernelEmulation(monkeypatch)
    g = torch.Generator().manual_seed(3)
    tokens, num_e, k, hidden, inter = 11, 4, 2, 320, 128  # H = 320: ragged 1x128 groups in GEMM1
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w1 = torch.randn(num_e, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(num_e, hidden, inter, generator=g) * inter ** -0.5
    b1 = (torch.randn(num_e, 2 * inter, generator=g) * 0.1).bfloat16()
    qw = quantize_weights(w1, w2, mode)
    weights, ids = route_reference(torch.randn(tokens, num_e, generator=g), k, renormalize=True)
    shared = torch.randn(tokens, hidden, generator=g).to(dtype)
    out = torch.full_like(x, float("nan"))
    ws = Workspace() if workspace else None
    got = layer.fused_moe(x=x, w1=None, w2=None, topk_weights=weights, topk_ids=ids, activation="silu", w1_bias=b1,
                          w2_bias=None, quant=qw, apply_router_weight_on_input=False, shared_output=shared, out=out,
                          workspace=ws)
    assert (ws is None) or ws.nbytes > 0
    assert got is out
    want = experts_reference(x, None, None, weights, ids, w1_bias=b1, quant=qw, shared_output=shared)
    assert ((out.float() - want.float()).norm() / want.float().norm()) < 5e-3  # rounding-level differences
    scaling = {"per_tensor": "tensor", "per_token": "token", "blockwise": "block"}[mode]
    first = ("permute_fp8_per_tensor",) if mode == "per_tensor" else ("permute_fp8", scaling)
    assert kernels.calls == [first, ("grouped_gemm", scaling, "silu", dtype), ("quantize_fp8", scaling),
                             ("grouped_gemm", scaling, "none", dtype)]
