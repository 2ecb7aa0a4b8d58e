"""GPU: cute_moe.permute (permute, permute_fp8, combine) against plain-torch expectations.

Outputs are poisoned (NaN / fp8 NaN) before each call so unwritten elements fail, fp8 results are
compared bitwise with cute_moe.quant's quantizers (run on the CPU, where torch divides by the scale
exactly as the kernel does), and every op is run twice and must be bitwise reproducible.
"""

from __future__ import annotations

import pytest
import torch

from cute_moe import quant
from cute_moe.permute import combine, permute, permute_fp8
from cute_moe.plan import make_plan
from routing_data import poison_like, random_topk_ids

pytestmark = pytest.mark.gpu

DEV = "cuda"
LAYOUTS = ("flat", "padded", "masked")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (T, H, E, k)
SHAPES = [(1, 7168, 256, 8), (333, 2880, 128, 4), (1000, 4096, 8, 2), (64, 2048, 128, 8)]


def _plan(T, k, E, kind="random", block_m=128, max_m=None):
    ids = random_topk_ids(T, k, E, kind, device=DEV)
    return make_plan(ids, E, block_m=block_m, max_m=max_m if max_m is not None else T)


def _layout_rows(plan, layout, pad_to=None):
    """(row -> flat index or -1 [R], mask of rows the kernel writes [R]) for ``layout``."""
    if layout == "flat":
        src = plan.row_src.long()
        return src, torch.arange(plan.num_rows, device=DEV) < plan.cu_seqlens[-1]
    if layout == "padded":
        src = plan.padded_row_src.long()
        return src, torch.arange(plan.padded_rows, device=DEV) < plan.padded_cu_seqlens[-1]
    pad_to = plan.block_m if pad_to is None else pad_to
    mm = plan.masked_m.long()
    limit = torch.minimum((mm + pad_to - 1) // pad_to * pad_to, torch.full_like(mm, plan.max_m))
    written = torch.arange(plan.max_m, device=DEV)[None, :] < limit[:, None]
    return plan.masked_row_src.long().reshape(-1), written.reshape(-1)


def _gather(rows_of_tokens, src, k):
    """rows_of_tokens[src // k] with zero rows where src < 0."""
    out = rows_of_tokens[(src.clamp(min=0) // k)]
    return torch.where((src >= 0).reshape(-1, *([1] * (out.dim() - 1))), out, torch.zeros_like(out))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, E, k", SHAPES)
@pytest.mark.parametrize("kind", ["random", "one_expert", "with_dropped"])
def test_permute(layout, dtype, T, H, E, k, kind):
    plan = _plan(T, k, E, kind, max_m=T if kind != "one_expert" else max(1, T // 2))
    x = torch.randn(T, H, device=DEV).to(dtype)
    src, written = _layout_rows(plan, layout)
    expected = _gather(x, src, k)
    shape = (E, plan.max_m, H) if layout == "masked" else (src.numel(), H)
    out = poison_like(torch.empty(shape, dtype=dtype, device=DEV))
    res = permute(x, plan, layout=layout, out=out)
    assert res is out
    got = out.reshape(-1, H)
    assert torch.equal(got[written], expected[written])
    assert torch.isnan(got[~written]).all()  # rows past the data are left alone
    assert torch.equal(permute(x, plan, layout=layout).reshape(-1, H)[written], got[written])


def _quant_reference(x, scaling):
    """Per-token or 1x128 quantization of x on the CPU: (q as uint8 [T, H], scale [T, G])."""
    fn = quant.quantize_per_token if scaling == "token" else quant.quantize_blockwise_act
    q, s = fn(x.cpu())
    return q.view(torch.uint8).to(DEV), s.reshape(x.shape[0], -1).to(DEV)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scaling", ["token", "block"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, E, k", SHAPES)
def test_permute_fp8(layout, scaling, dtype, T, H, E, k):
    plan = _plan(T, k, E, "skewed")
    x = (torch.randn(T, H, device=DEV) * torch.rand(T, 1, device=DEV) * 10).to(dtype)
    x[0, : min(H, 300)] = 0  # an all-zero 1x128 group (and a partly zero row)
    if T > 3:
        x[3] = 0  # an all-zero row: scale = AMAX_EPS / 448
    q_ref, s_ref = _quant_reference(x, scaling)
    src, written = _layout_rows(plan, layout)
    G = s_ref.shape[1]
    if layout == "masked":
        q_shape = (E, plan.max_m, H)
        s_shape = (E, plan.max_m) if scaling == "token" else (E, G, plan.max_m)
    else:
        q_shape = (src.numel(), H)
        s_shape = (src.numel(),) if scaling == "token" else (G, src.numel())
    out = poison_like(torch.empty(q_shape, dtype=torch.float8_e4m3fn, device=DEV))
    out_scale = poison_like(torch.empty(s_shape, device=DEV))
    permute_fp8(x, plan, layout=layout, scaling=scaling, out=out, out_scale=out_scale)
    q = out.view(torch.uint8).reshape(-1, H)
    assert torch.equal(q[written], _gather(q_ref, src, k)[written])
    assert torch.equal(_scale_rows(out_scale, layout, scaling)[written], _gather(s_ref, src, k)[written])
    assert torch.isnan(_scale_rows(out_scale, layout, scaling)[~written]).all()
    q2, s2 = permute_fp8(x, plan, layout=layout, scaling=scaling)
    assert torch.equal(q2.view(torch.uint8).reshape(-1, H)[written], q[written])
    assert torch.equal(_scale_rows(s2, layout, scaling)[written], _scale_rows(out_scale, layout, scaling)[written])


def _scale_rows(scale, layout, scaling):
    """Scales as [rows, groups] whatever the layout ([R], [G, R], [E, max_m] or [E, G, max_m])."""
    if scaling == "token":
        return scale.reshape(-1, 1)
    if layout == "masked":
        return scale.permute(0, 2, 1).reshape(-1, scale.shape[1])
    return scale.t()


def test_permute_unaligned_rows_and_odd_hidden():
    plan = _plan(77, 4, 16)
    for x in (torch.randn(77, 2881, device=DEV).bfloat16(),            # H * 2 bytes not a multiple of 4
              torch.randn(77, 4097, device=DEV).bfloat16()[:, 1:],     # misaligned data pointer
              torch.randn(77, 33, device=DEV)):                         # fp32, 4-byte vectors
        src, written = _layout_rows(plan, "padded")
        got = permute(x, plan, layout="padded")
        assert torch.equal(got[written], _gather(x, src, 4)[written])
    with pytest.raises(ValueError, match="H % 16"):
        permute_fp8(torch.randn(77, 2888, device=DEV).bfloat16(), plan)
    with pytest.raises(ValueError, match="16-byte"):
        permute_fp8(torch.randn(77, 4112, device=DEV).bfloat16()[:, 4:4100], plan)


def test_permute_masked_pad_to():
    plan = _plan(200, 8, 32, max_m=200)
    x = torch.randn(200, 512, device=DEV).bfloat16()
    for pad_to in (1, 16, 1000):
        out = poison_like(torch.empty(32, 200, 512, dtype=torch.bfloat16, device=DEV))
        permute(x, plan, layout="masked", out=out, pad_to=pad_to)
        src, written = _layout_rows(plan, "masked", pad_to=pad_to)
        got = out.reshape(-1, 512)
        assert torch.equal(got[written], _gather(x, src, 8)[written]) and torch.isnan(got[~written]).all()


def _combine_reference(y_rows, plan, layout, w, addend, dtype):
    rows = plan.dest_rows(layout).long()  # [T, k]
    y = torch.where((rows >= 0)[..., None], y_rows[rows.clamp(min=0)].double(), 0.0)
    w = torch.ones(rows.shape, dtype=torch.float64, device=DEV) if w is None else w.double()
    ref = (y * w[..., None]).sum(1)
    if addend is not None:
        ref = ref + addend.double()
    return ref.to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, E, k", SHAPES + [(65536, 256, 256, 8)])
@pytest.mark.parametrize("extras", ["weights", "no_weights", "addend_bf16", "addend_fp32"])
def test_combine(layout, dtype, T, H, E, k, extras):
    plan = _plan(T, k, E, "with_dropped" if T < 1000 else "random", max_m=max(64, 4 * T * k // E))
    R = plan.rows(layout)
    y = torch.randn(R, H, device=DEV).to(dtype)
    src, _ = _layout_rows(plan, layout)
    y[src < 0] = float("nan")  # padding / empty rows must never be read
    w = None if extras == "no_weights" else torch.rand(T, k, device=DEV)
    addend = None
    if extras.startswith("addend"):
        addend = torch.randn(T, H, device=DEV).to(torch.bfloat16 if extras == "addend_bf16" else torch.float32)
    out = poison_like(torch.empty(T, H, dtype=dtype, device=DEV))
    y_in = y.reshape(E, plan.max_m, H) if layout == "masked" else y
    combine(y_in, plan, w, layout=layout, addend=addend, out=out)
    ref = _combine_reference(y, plan, layout, w, addend, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(out, ref, **tol)
    again = combine(y_in, plan, w, layout=layout, addend=addend)
    assert torch.equal(again, out)  # bitwise reproducible


def test_combine_odd_hidden_and_strided_addend():
    plan = _plan(50, 2, 8)
    y = torch.randn(100, 2881, device=DEV).bfloat16()
    addend = torch.randn(50, 2890, device=DEV)[:, :2881]
    w = torch.rand(50, 2, device=DEV)
    out = combine(y, plan, w, addend=addend)
    ref = _combine_reference(y, plan, "flat", w, addend, torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=1e-3)


def test_pipeline_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    plan = _plan(64, 8, 128)
    x = torch.randn(64, 2048, device=DEV).bfloat16()
    xp = permute(cupy.from_dlpack(x), plan)
    assert isinstance(xp, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(xp), permute(x, plan))
    q, s = permute_fp8(cupy.from_dlpack(x), plan)
    assert isinstance(q, cupy.ndarray) and q.dtype == cupy.uint8 and isinstance(s, cupy.ndarray)
    w = torch.rand(64, 8, device=DEV)
    y = combine(xp, plan, cupy.from_dlpack(w))
    assert isinstance(y, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(y), combine(permute(x, plan), plan, w))


def test_pipeline_cuda_graph_replay():
    """route -> plan -> permute (bf16 and fp8) -> a stand-in GEMM -> combine, captured once and
    replayed with new logits and inputs copied into the captured buffers."""
    from cute_moe.routing import route_gpu

    T, H, E, k = 512, 2048, 128, 8
    logits = torch.randn(T, E, device=DEV).bfloat16()
    x = torch.randn(T, H, device=DEV).bfloat16()

    def step():
        w, ids = route_gpu(logits, k, scoring="softmax", renormalize=True)
        plan = make_plan(ids, E, block_m=64)
        xp = permute(x, plan, layout="padded")
        q, s = permute_fp8(x, plan, layout="padded")
        y = xp * 2
        return w, ids, plan, xp, q, s, combine(y, plan, w, layout="padded")

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    for _ in range(3):
        logits.copy_(torch.randn(T, E, device=DEV).bfloat16())
        x.copy_(torch.randn(T, H, device=DEV).bfloat16())
        g.replay()
        torch.cuda.synchronize()
        expected = step()
        w, ids, plan, xp, q, s, out = captured
        used = int(expected[2].padded_cu_seqlens[-1])  # rows past it are not written
        assert torch.equal(w, expected[0]) and torch.equal(ids, expected[1])
        assert torch.equal(plan.padded_row_src, expected[2].padded_row_src)
        assert torch.equal(xp[:used], expected[3][:used])
        assert torch.equal(q[:used].view(torch.uint8), expected[4][:used].view(torch.uint8))
        assert torch.equal(s[:, :used], expected[5][:, :used])
        assert torch.equal(out, expected[6])
        torch.testing.assert_close(out, (2 * x.float()).bfloat16(), rtol=2 ** -7, atol=1e-2)


def test_validation():
    plan = _plan(16, 2, 8, block_m=None, max_m=None)
    x = torch.randn(16, 64, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="block_m"):
        permute(x, plan, layout="padded")
    with pytest.raises(ValueError, match="rows"):
        permute(x[:8], plan)
    with pytest.raises(TypeError, match="x"):
        permute(x.double(), plan)
    with pytest.raises(ValueError, match="out"):
        permute(x, plan, out=torch.empty(31, 64, device=DEV, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="plan"):
        permute(x, object())
    y = torch.randn(32, 64, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="topk_weights"):
        combine(y, plan, torch.rand(16, 3, device=DEV))
    with pytest.raises(ValueError, match="y"):
        combine(y[:31], plan)
    with pytest.raises(ValueError, match="scaling"):
        permute_fp8(x, plan, scaling="tensor")
