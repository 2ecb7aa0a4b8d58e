"""Hopper grouped GEMM vs a float32 reference: ragged segments, masked layout, epilogues, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from cute_moe.reference import gated_activation_reference
from gpu_checks import needs_sm90, rel_err

pytestmark = pytest.mark.gpu

TOL = 1e-2


def _cu(counts: list[int]) -> torch.Tensor:
    c = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return c.to(torch.int32).cuda()


def _reference(a, b, cu, activation="none", bias=None, row_scale=None):
    """float32 per-expert GEMM + epilogue on the GPU."""
    outs = []
    cu_l = cu.tolist()
    for e in range(b.shape[0]):
        rows = a[cu_l[e]:cu_l[e + 1]].float()
        h = rows @ b[e].float().T
        if bias is not None:
            h = h + bias[e].float()
        if activation != "none":
            h = gated_activation_reference(h, activation)
        if row_scale is not None:
            h = h * row_scale[cu_l[e]:cu_l[e + 1], None]
        outs.append(h)
    return torch.cat(outs)


def _data(counts, n, k, num_experts):
    m = sum(counts)
    a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    b = (torch.randn(num_experts, n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    return a, b, _cu(counts)


# 1, 3, 64, 129, 192: a 128-row tile whose second warpgroup has no rows (it skips the WGMMAs); 65, 127: one or more
RAGGED = [0, 1, 127, 129, 256, 0, 3, 64, 65, 192]


@needs_sm90
@pytest.mark.parametrize("tile", [(128, 256), (128, 256, 2), (64, 256), (64, 128, 2), (64, 64), (64, 96), (64, 160),
                                  (128, 192), (128, 224), (128, 256, 1, 0, False, True), (128, 224, 1, 0, False, True)])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu", "swiglu_oai"])
def test_ragged_segments(tile, activation):
    from cute_moe.gemm import GemmConfig, grouped_gemm

    n, k = (2 * 136, 264) if activation != "none" else (200, 264)  # N, K not multiples of the tile
    a, b, cu = _data(RAGGED, n, k, len(RAGGED))
    out = torch.full((a.shape[0], n // 2 if activation != "none" else n), float("nan"),
                     device="cuda", dtype=torch.bfloat16)
    grouped_gemm(a, b, cu, activation=activation, out=out, config=GemmConfig(*tile))
    assert rel_err(out, _reference(a, b, cu, activation)) < TOL


@needs_sm90
@pytest.mark.parametrize("tile", [(128, 256), (64, 128), (64, 64), (64, 96)])
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("k", [264, 2048])
def test_segments_ready_prefetch(tile, activation, k):
    """segments_ready: the weights of each CTA's first tile are loaded before the wait for the previous
    kernel. Fewer and more k-tiles than pipeline stages; several tiles per CTA; A written by the kernel
    right before the GEMM."""
    from cute_moe.gemm import GemmConfig, grouped_gemm

    n = 2 * 136 if activation != "none" else 200
    a, b, cu = _data([3000, 0, 2500, 1, 0, 700], n, k, 6)
    a_src = torch.randn_like(a)
    out = torch.full((a.shape[0], n // 2 if activation != "none" else n), float("nan"),
                     device="cuda", dtype=torch.bfloat16)
    a.copy_(a_src)
    grouped_gemm(a, b, cu, activation=activation, out=out, config=GemmConfig(*tile), segments_ready=True)
    assert rel_err(out, _reference(a_src, b, cu, activation)) < TOL


@needs_sm90
@pytest.mark.parametrize("num_experts", [8, 128, 256])
def test_many_experts_random_routing(num_experts):
    from cute_moe.gemm import grouped_gemm

    counts = torch.distributions.Multinomial(2000, torch.rand(num_experts)).sample().int().tolist()
    a, b, cu = _data(counts, 512, 256, num_experts)
    out = grouped_gemm(a, b, cu, activation="silu")
    assert rel_err(out, _reference(a, b, cu, "silu")) < TOL


@needs_sm90
def test_one_hot_expert_and_single_row():
    from cute_moe.gemm import grouped_gemm

    for counts in ([0, 0, 1000, 0], [0, 0, 0, 1], [1, 0, 0, 0]):
        a, b, cu = _data(counts, 384, 512, 4)
        out = torch.full((a.shape[0], 384), float("nan"), device="cuda", dtype=torch.bfloat16)
        grouped_gemm(a, b, cu, out=out)
        assert rel_err(out, _reference(a, b, cu)) < TOL


@needs_sm90
@pytest.mark.parametrize("activation", ["none", "swiglu_oai"])
def test_bias_and_row_scale(activation):
    from cute_moe.gemm import grouped_gemm

    n, k = 512, 256
    a, b, cu = _data(RAGGED, n, k, len(RAGGED))
    bias = torch.randn(len(RAGGED), n, device="cuda").to(torch.bfloat16)
    scale = torch.rand(a.shape[0], device="cuda")
    out = grouped_gemm(a, b, cu, activation=activation, bias=bias, row_scale=scale)
    assert rel_err(out, _reference(a, b, cu, activation, bias, scale)) < TOL


@needs_sm90
def test_float32_output():
    from cute_moe.gemm import grouped_gemm

    a, b, cu = _data(RAGGED, 256, 256, len(RAGGED))
    out = grouped_gemm(a, b, cu, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, _reference(a, b, cu)) < 1e-3


@needs_sm90
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_masked_layout_writes_only_valid_rows(activation):
    from cute_moe.gemm import grouped_gemm

    num_experts, max_m, n, k = 6, 160, 256, 192
    masked = torch.tensor([0, 1, 160, 65, 129, 7], dtype=torch.int32, device="cuda")
    a = torch.randn(num_experts, max_m, k, device="cuda").to(torch.bfloat16)
    b = (torch.randn(num_experts, n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    n_out = n // 2 if activation != "none" else n
    out = torch.full((num_experts, max_m, n_out), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm(a, b, masked_m=masked, activation=activation, out=out)
    for e, cnt in enumerate(masked.tolist()):
        ref = a[e, :cnt].float() @ b[e].float().T
        if activation != "none":
            ref = gated_activation_reference(ref, activation)
        if cnt:
            assert rel_err(out[e, :cnt], ref) < TOL
        assert torch.isnan(out[e, cnt:].float()).all(), f"expert {e}: rows past masked_m were written"


@needs_sm90
def test_cuda_graph_replay_with_new_offsets():
    from cute_moe.gemm import grouped_gemm

    num_experts, m, n, k = 8, 1024, 256, 256
    a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    b = (torch.randn(num_experts, n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    cu = _cu([128] * 8)
    out = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
    grouped_gemm(a, b, cu, activation="silu", out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        grouped_gemm(a, b, cu, activation="silu", out=out)
    for counts in ([0, 1024, 0, 0, 0, 0, 0, 0], [1, 2, 3, 500, 0, 0, 18, 500], [128] * 8):
        cu.copy_(_cu(counts))
        a.copy_(torch.randn_like(a, dtype=torch.float32))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, _reference(a, b, cu, "silu")) < TOL


def _dynamic_case(counts, n=512, k=1024, num_experts=None):
    from cute_moe.gemm import GemmConfig

    a, b, cu = _data(counts, n, k, num_experts or len(counts))
    return a, b, cu, GemmConfig(128, 256, dynamic=True)


@needs_sm90
def test_dynamic_schedule_on_concurrent_streams():
    """Dynamically scheduled GEMMs on two streams at once, many launches each: every stream has its own
    tile counter and each launch leaves it zeroed for the next (a shared or stale counter skips tiles:
    NaN rows, or hangs)."""
    from cute_moe.gemm import grouped_gemm

    cases = [_dynamic_case([700, 0, 65, 1300, 192, 1]), _dynamic_case([64, 129, 900, 0, 0, 2000])]
    refs = [_reference(a, b, cu, "silu") for a, b, cu, _ in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[torch.full((a.shape[0], 256), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(20)]
            for a, _, _, _ in cases]
    torch.cuda.synchronize()
    for j in range(20):
        for (a, b, cu, cfg), s, o in zip(cases, streams, outs):
            with torch.cuda.stream(s):
                grouped_gemm(a, b, cu, activation="silu", out=o[j], config=cfg)
    torch.cuda.synchronize()
    for o, ref in zip(outs, refs):
        assert max(rel_err(x, ref) for x in o) < TOL


@needs_sm90
def test_dynamic_schedule_first_call_under_capture(monkeypatch):
    """With no zeroed counter buffer yet, a call captured into a graph runs the static tile order
    (allocating one during capture would leave it uninitialized for eager calls); later eager calls
    allocate it and schedule dynamically. Both give the same result."""
    from cute_moe.gemm import grouped_gemm
    from cute_moe.gemm import interface

    monkeypatch.setattr(interface, "_COUNTERS", {})
    monkeypatch.setattr(interface, "_COUNTER_SLOT", {})
    a, b, cu, cfg = _dynamic_case([300, 0, 1000, 77])
    out = torch.full((a.shape[0], 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm(a, b, cu, activation="silu", out=out, config=cfg)  # compile outside the capture
    interface._COUNTERS.clear()  # (the monkeypatched dicts) as if no counter had been allocated
    interface._COUNTER_SLOT.clear()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        grouped_gemm(a, b, cu, activation="silu", out=out, config=cfg)
    assert interface._COUNTERS == {}
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = _reference(a, b, cu, "silu")
    assert rel_err(out, ref) < TOL
    out2 = grouped_gemm(a, b, cu, activation="silu", config=cfg)
    assert len(interface._COUNTERS) == 1
    assert torch.equal(out, out2)


@needs_sm90
def test_bad_inputs_raise():
    from cute_moe.gemm import grouped_gemm

    a, b, cu = _data([4, 4], 64, 64, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        grouped_gemm(a, b, cu[:-1])
    with pytest.raises(ValueError, match="b:"):
        grouped_gemm(a, b.float(), cu)
    with pytest.raises(ValueError, match="K and N"):
        grouped_gemm(a[:, :60].contiguous(), b[:, :, :60].contiguous(), cu)
    with pytest.raises(ValueError, match="exactly one"):
        grouped_gemm(a, b)
