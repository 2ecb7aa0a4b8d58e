"""GPU: cute_moe.plan.route_and_plan (route + plan in one kernel, kernels/route_plan.cu).

Its ids and weights must be bitwise those of route_gpu (the same selection code) and equal to
route_reference's; its plan bitwise equal to plan_reference of those ids, in every layout, whatever
the grid (one CTA, several CTAs meeting at the grid barrier, several tokens per warp). Outputs and
the plan buffer are poisoned first so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from cute_moe.plan import plan_buffer_ints, plan_reference, route_and_plan
from cute_moe.reference import route_reference
from cute_moe.routing import route_gpu
from routing_data import poison_like
from test_plan_cpu import check_plan_invariants, plan_fields
from test_routing_gpu import CONFIGS, _inputs

pytestmark = pytest.mark.gpu

DEV = "cuda"
_BY_NAME = {c[0]: c for c in CONFIGS}
# (config, T): one CTA, two CTAs, ragged grids, more CTAs than fit at one token per warp
CASES = [(name, T) for name in ("mixtral", "qwen3", "gpt_oss", "deepseek_v3", "deepseek_nobias", "qwen2",
                                 "llama4", "e_odd", "softmax_groups")
         for T in (1, 7, 33, 1000, 4096)] + [("deepseek_v3", 9000), ("mixtral", 8192), ("qwen3", 5555)]


def _logits(name, T, skew):
    _, E, k, opts = _BY_NAME[name]
    logits, kw = _inputs(T, E, torch.bfloat16, opts)
    if skew == "hot":  # every token's best experts are the same k: one hot segment, the rest empty
        logits[:, :k] += 20
    return logits, k, kw


def _check(logits, k, kw, *, block_m=None, max_m=None, tokens_per_cta=None, fused=True):
    T, E = logits.shape
    n = T * k
    buf = torch.full((plan_buffer_ints(n, E, block_m=block_m, max_m=max_m),), -123456789, dtype=torch.int32,
                     device=DEV)
    out = (poison_like(torch.empty(T, k, device=DEV)), poison_like(torch.empty(T, k, dtype=torch.int32, device=DEV)))
    w, ids, plan = route_and_plan(logits, k, **kw, block_m=block_m, max_m=max_m, out=out, buffer=buf,
                                  fused=fused, tokens_per_cta=tokens_per_cta)
    assert w is out[0] and ids is out[1]
    w_sep, ids_sep = route_gpu(logits, k, **kw)
    assert torch.equal(ids, ids_sep)
    assert torch.equal(w.view(torch.int32), w_sep.view(torch.int32))  # bitwise, NaN-safe
    w_ref, ids_ref = route_reference(logits, k, **kw)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12)
    ref = plan_reference(ids_ref, E, block_m=block_m, max_m=max_m)
    for name, t in plan_fields(ref).items():
        got = getattr(plan, name)
        assert torch.equal(got, t), f"{name}: first mismatch at {torch.nonzero(got != t)[:3].tolist()}"
    check_plan_invariants(plan, ids)
    return w, ids, plan


@pytest.mark.parametrize("name, T", CASES, ids=[f"{n}-T{t}" for n, t in CASES])
def test_route_and_plan_matches_separate_calls(name, T):
    for skew in ("random", "hot"):
        logits, k, kw = _logits(name, T, skew)
        _check(logits, k, kw)


@pytest.mark.parametrize("tokens_per_cta", [1, 3, 32, 100, 300])  # 300: 16-bit histograms
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3", "mixtral"])
def test_route_and_plan_grid_shapes_and_layouts(name, tokens_per_cta):
    for T in (1, 64, 1000, 4099):
        logits, k, kw = _logits(name, T, "random")
        _, E, _, _ = _BY_NAME[name]
        for block_m, max_m in ((None, None), (128, None), (64, 2 * T), (1, max(1, T * k // E // 2))):
            _check(logits, k, kw, block_m=block_m, max_m=max_m, tokens_per_cta=tokens_per_cta)


def test_route_and_plan_auto_and_unfused_agree():
    """fused=None (auto; unfused at 65536 tokens) and fused=True give the same plan as fused=False;
    fused=True refuses 65536 tokens (16-bit histograms)."""
    for T in (64, 4096, 65536):
        logits, k, kw = _logits("deepseek_v3", T, "random")
        runs = [route_and_plan(logits, k, **kw, block_m=128, fused=f) for f in (False, None, True)[:3 - (T == 65536)]]
        for w, ids, plan in runs[1:]:
            assert torch.equal(ids, runs[0][1]) and torch.equal(w, runs[0][0])
            for field, t in plan_fields(runs[0][2]).items():
                assert torch.equal(getattr(plan, field), t), (T, field)


def test_route_and_plan_fused_refuses_65536_tokens():
    logits, k, kw = _logits("mixtral", 65536, "random")
    with pytest.raises(RuntimeError, match="T < 65536"):
        route_and_plan(logits, k, **kw, fused=True)


def test_route_and_plan_deterministic():
    logits, k, kw = _logits("qwen3", 4096, "random")
    a = route_and_plan(logits, k, **kw, fused=True)
    b = route_and_plan(logits, k, **kw, fused=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for field, t in plan_fields(a[2]).items():
        assert torch.equal(getattr(b[2], field), t), field


@pytest.mark.parametrize("T", [1, 4096])
def test_route_and_plan_cuda_graph_replay_with_new_logits(T):
    name = "deepseek_v3"
    _, E, k, opts = _BY_NAME[name]
    static, kw = _inputs(T, E, torch.bfloat16, opts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile and load outside the capture
        route_and_plan(static, k, **kw, block_m=128, fused=True)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, ids, plan = route_and_plan(static, k, **kw, block_m=128, fused=True)
    for skew in ("random", "hot", "random"):
        new, _, _ = _logits(name, T, skew)
        static.copy_(new)
        for t in (w, ids, plan.row_src, plan.cu_seqlens, plan.padded_row_src):
            t.fill_(-7)
        g.replay()
        torch.cuda.synchronize()
        w_ref, ids_ref = route_reference(static, k, **kw)
        assert torch.equal(ids, ids_ref), skew
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12)
        ref = plan_reference(ids_ref, E, block_m=128)
        for field, t in plan_fields(ref).items():
            assert torch.equal(getattr(plan, field), t), (skew, field)


def test_route_and_plan_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    logits, k, kw = _logits("gpt_oss", 300, "random")
    w, ids, plan = route_and_plan(cupy.from_dlpack(logits), k, **kw, fused=True)
    assert isinstance(w, cupy.ndarray) and isinstance(ids, cupy.ndarray)
    w_ref, ids_ref = route_reference(logits, k, **kw)
    assert torch.equal(torch.from_dlpack(ids), ids_ref)
    assert torch.equal(plan.row_src, plan_reference(ids_ref, logits.shape[1]).row_src)


def test_route_and_plan_validation():
    logits, k, kw = _logits("qwen3", 8, "random")
    with pytest.raises(ValueError, match="tokens_per_cta"):
        route_and_plan(logits, k, **kw, tokens_per_cta=0)
    with pytest.raises(ValueError, match="buffer"):
        route_and_plan(logits, k, **kw, buffer=torch.empty(3, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="block_m"):
        route_and_plan(logits, k, **kw, block_m=0)


def test_route_and_plan_concurrent_streams():
    """Cooperative launches on several streams at once: each grid barrier is its own (the driver's
    per-launch workspace), so concurrent plans stay exact."""
    streams = [torch.cuda.Stream() for _ in range(4)]
    jobs = []
    for i, name in enumerate(["deepseek_v3", "qwen3", "gpt_oss", "mixtral"] * 2):
        logits, k, kw = _logits(name, 4096 - 37 * i, "random")
        jobs.append((streams[i % 4], logits, k, kw))
    torch.cuda.synchronize()
    results = []
    for _ in range(3):
        for s, logits, k, kw in jobs:
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                results.append(route_and_plan(logits, k, **kw, fused=True))
    torch.cuda.synchronize()
    for n, (w, ids, plan) in enumerate(results):
        _, logits, k, kw = jobs[n % len(jobs)]
        ids_ref = route_reference(logits, k, **kw)[1]
        assert torch.equal(ids, ids_ref), n
        ref = plan_reference(ids_ref, logits.shape[1])
        for field, t in plan_fields(ref).items():
            assert torch.equal(getattr(plan, field), t), (n, field)
