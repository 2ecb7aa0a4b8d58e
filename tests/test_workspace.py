"""cute_moe.Workspace: views carved from one reusable buffer, and the layer's allocation-free path.

CPU tests cover the carving, the plan's buffer size, the layer's view specs and the API checks; the
GPU tests (sm_90) check that a warmed-up call with ``out=`` and a workspace allocates nothing and
returns bitwise what the allocating call returns, for bf16 and every fp8 mode.
"""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe import layer, quant
from cute_moe.plan import _FUSED_MAX_CTAS, _MIN_CHUNK, _SINGLE_CTA_MAX_ROWS, _warps, plan_buffer_ints
from cute_moe.workspace import Workspace
from gpu_checks import needs_sm90

CPU = torch.device("cpu")


def test_views_are_aligned_typed_and_reuse_the_buffer():
    ws = Workspace()
    assert ws.nbytes == 0 and "unallocated" in repr(ws)
    a, b, c = ws.views(CPU, [((3, 5), torch.bfloat16), ((7,), torch.int32), ((2, 2), torch.float8_e4m3fn)])
    assert (a.shape, a.dtype, b.shape, b.dtype, c.dtype) == ((3, 5), torch.bfloat16, (7,), torch.int32,
                                                             torch.float8_e4m3fn)
    base = ws._buf.data_ptr()
    assert [(t.data_ptr() - base) % 256 for t in (a, b, c)] == [0, 0, 0]
    assert a.is_contiguous() and b.is_contiguous() and ws.nbytes == 3 * 256
    buf = ws._buf
    (d,) = ws.views(CPU, [((100,), torch.float32)])  # fits: same buffer, aliasing the old views
    assert ws._buf is buf and d.data_ptr() == base
    (e,) = ws.views(CPU, [((1000,), torch.float32)])  # grows once
    assert ws._buf is not buf and ws.nbytes >= 4000 and e.numel() == 1000


@pytest.mark.parametrize("rows, experts", [(1, 8), (2048, 256), (2049, 256), (32768, 256), (65536, 8)])
def test_plan_buffer_holds_the_plan_and_its_chunk_histograms(rows, experts):
    plan_ints = -(-(experts + (experts + 1) + 2 * rows) // 4) * 4  # histograms start 16-byte aligned
    nw = _warps(experts)
    fused_chunks = 0 if rows <= 1 else min(_FUSED_MAX_CTAS, rows)  # route_and_plan's CTAs
    if rows <= _SINGLE_CTA_MAX_ROWS:
        assert plan_buffer_ints(rows, experts) == plan_ints + fused_chunks * experts
    else:
        threads = 32 * nw
        chunk = -(-max(-(-rows // 128), _MIN_CHUNK) // threads) * threads
        assert plan_buffer_ints(rows, experts) == plan_ints + max(-(-rows // chunk), fused_chunks) * experts
    assert plan_buffer_ints(rows, experts, block_m=64) > plan_buffer_ints(rows, experts)
    extra = plan_buffer_ints(rows, experts, max_m=4) - plan_buffer_ints(rows, experts)  # up to 16-byte alignment
    assert abs(extra - (experts * 5 + rows + 1)) < 4


@pytest.mark.parametrize("mode", [None, "per_tensor", "per_token", "blockwise"])
def test_layer_views_cover_every_intermediate(mode):
    e, k, h, i, t = 4, 2, 320, 160, 5
    x = torch.randn(t, h).to(torch.bfloat16)
    qw = None if mode is None else quant.quantize_weights(torch.randn(e, 2 * i, h), torch.randn(e, h, i), mode)
    views = layer._workspace_views(Workspace(), x, qw, e, i, t * k)
    rows = t * k
    assert views["plan"].numel() == plan_buffer_ints(rows, e) and views["plan"].dtype == torch.int32
    assert views["h"].shape == (rows, i) and views["y"].shape == (rows, h)
    if mode is None:
        assert set(views) == {"plan", "xp", "h", "y"} and views["xp"].shape == (rows, h)
        return
    assert set(views) == {"plan", "xq", "xs", "h", "hq", "hs", "y"}
    assert views["xq"].dtype == views["hq"].dtype == torch.float8_e4m3fn
    want = {"per_tensor": ((2,), (2,)), "per_token": ((rows,), (rows,)), "blockwise": ((3, rows), (2, rows))}
    assert (tuple(views["xs"].shape), tuple(views["hs"].shape)) == want[mode]


def test_workspace_argument_is_checked_and_ignored_by_the_reference():
    e, k, h, i, t = 4, 2, 32, 16, 6
    x = torch.randn(t, h)
    w1, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    weights, ids = cute_moe.route(torch.randn(t, e), k)
    with pytest.raises(TypeError, match="workspace: expected a cute_moe.Workspace"):
        cute_moe.fused_moe(x, w1, w2, weights, ids, workspace=torch.empty(8))
    ws = Workspace()
    got = cute_moe.fused_moe(x, w1, w2, weights, ids, workspace=ws)
    assert torch.equal(got, cute_moe.fused_moe(x, w1, w2, weights, ids)) and ws.nbytes == 0
    router = torch.randn(e, h)
    assert torch.equal(cute_moe.moe(x, router, w1, w2, k, workspace=ws), cute_moe.moe(x, router, w1, w2, k))


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("mode", [None, "per_tensor", "per_token", "blockwise"])
@pytest.mark.parametrize("tokens", [1, 300, 3000])
def test_call_with_out_and_workspace_allocates_nothing(mode, tokens):
    e, k, h, i = 8, 2, 256, 128
    w1 = (torch.randn(e, 2 * i, h, device="cuda") * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, device="cuda") * i**-0.5).to(torch.bfloat16)
    qw = None if mode is None else quant.quantize_weights(w1, w2, mode)
    ws_args = (w1, w2) if mode is None else (None, None)
    x = torch.randn(tokens, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(tokens, e, device="cuda"), k, renormalize=True)
    want = cute_moe.fused_moe(x, *ws_args, weights, ids, quant=qw, backend="cute")
    ws, out = Workspace(), torch.full_like(x, float("nan"))
    cute_moe.fused_moe(x, *ws_args, weights, ids, quant=qw, out=out, workspace=ws, backend="cute")
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    cute_moe.fused_moe(x, *ws_args, weights, ids, quant=qw, out=out, workspace=ws, backend="cute")
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after == before, f"{after - before} allocations"
    assert torch.equal(out, want)
