"""GPU: cute_moe.routing.route_gpu against cute_moe.reference.route_reference (run on the same GPU).

Logits are random normal values rounded to bf16 (then cast to the tested dtype): distinct logits are
then at least a bf16 step apart, far more than float32 rounding, so the selection has no near-ties
that a different (but correct) float32 summation order could flip; exact ties (equal logits) do occur
and must go to the lower expert index.
"""

from __future__ import annotations

import pytest
import torch

from cute_moe.reference import route_reference
from cute_moe.routing import route_gpu, router_logits
from routing_data import poison_like

pytestmark = pytest.mark.gpu

DEV = "cuda"
# (name, E, k, routing kwargs)
CONFIGS = [
    ("mixtral", 8, 2, dict(scoring="softmax", renormalize=True)),
    ("qwen2", 60, 4, dict(scoring="softmax", renormalize=False)),
    ("qwen3", 128, 8, dict(scoring="softmax", renormalize=True)),
    ("gpt_oss", 128, 4, dict(scoring="softmax", renormalize=True)),
    ("deepseek_v3", 256, 8, dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4,
                                  routed_scaling_factor=2.5, bias=True)),
    ("deepseek_nobias", 256, 8, dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4)),
    ("llama4", 128, 1, dict(scoring="sigmoid", renormalize=False)),
    ("softmax_groups", 512, 16, dict(scoring="softmax", renormalize=True, num_groups=16, topk_groups=8)),
    ("group_size_1", 16, 3, dict(scoring="sigmoid", renormalize=True, num_groups=16, topk_groups=5, bias=True)),
    ("group_size_8", 64, 4, dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=3, bias=True)),
    ("group_size_64", 128, 6, dict(scoring="sigmoid", renormalize=False, num_groups=2, topk_groups=1, bias=True)),
    ("e_odd", 37, 5, dict(scoring="sigmoid", renormalize=False)),
]


def _inputs(num_tokens, num_experts, dtype, opts, *, ties=False):
    logits = torch.randn(num_tokens, num_experts, device=DEV) * 2
    if ties:  # coarse values: many exactly equal logits per row
        logits = (logits * 2).round() / 2
    logits = logits.bfloat16().to(dtype)
    kw = {k: v for k, v in opts.items() if k != "bias"}
    if opts.get("bias"):
        kw["correction_bias"] = (torch.randn(num_experts, device=DEV) * 0.1).bfloat16().float()
    return logits, kw


def _check(logits, top_k, kw):
    w, ids = route_gpu(logits, top_k, **kw)
    w_ref, ids_ref = route_reference(logits, top_k, **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    bad = (ids != ids_ref).any(dim=1)
    assert not bad.any(), (f"{int(bad.sum())} of {len(ids)} tokens select different experts; first: "
                           f"got {ids[bad][:3].tolist()} expected {ids_ref[bad][:3].tolist()}")
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12)
    return w, ids


@pytest.mark.parametrize("name, num_experts, top_k, opts", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("num_tokens", [1, 7, 1000, 65536])
def test_route_matches_reference(name, num_experts, top_k, opts, num_tokens):
    logits, kw = _inputs(num_tokens, num_experts, torch.bfloat16, opts)
    _check(logits, top_k, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, num_experts, top_k, opts", [CONFIGS[2], CONFIGS[4]], ids=["qwen3", "deepseek_v3"])
def test_route_dtypes_and_ties(dtype, name, num_experts, top_k, opts):
    for ties in (False, True):
        logits, kw = _inputs(513, num_experts, dtype, opts, ties=ties)
        if "correction_bias" in kw:
            kw["correction_bias"] = kw["correction_bias"].to(dtype)
        _check(logits, top_k, kw)


def test_route_strided_rows_and_out_poisoned():
    logits = torch.randn(300, 256, device=DEV).bfloat16()[:, :128]  # row stride 256
    kw = dict(scoring="softmax", renormalize=True)
    out = (poison_like(torch.empty(300, 4, device=DEV)), poison_like(torch.empty(300, 4, device=DEV, dtype=torch.int32)))
    w, ids = route_gpu(logits, 4, out=out, **kw)
    assert w is out[0] and ids is out[1]
    w_ref, ids_ref = route_reference(logits, 4, **kw)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1])
def test_route_deepseek_views(dtype, offset):
    """DeepSeek-V3 routing reads 8 experts per lane with 16-byte loads when rows and bias are 16-byte
    aligned, else takes the generic path: both match the reference, with ties, on strided views."""
    _, _, top_k, opts = CONFIGS[4]
    for ties in (False, True):
        base, kw = _inputs(777, 264, dtype, opts, ties=ties)
        logits = base[:, offset:offset + 256]  # row stride 264; offset 1 leaves 16-byte alignment
        bias = torch.randn(264, device=DEV) * 0.1
        kw["correction_bias"] = bias[offset:offset + 256]
        _check(logits, top_k, kw)


def test_route_deterministic():
    logits = torch.randn(4096, 256, device=DEV).bfloat16()
    bias = torch.randn(256, device=DEV) * 0.1
    kw = dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4, correction_bias=bias,
              routed_scaling_factor=2.5)
    a = route_gpu(logits, 8, **kw)
    b = route_gpu(logits, 8, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_route_nan_logits_follow_reference():
    logits = torch.randn(4, 32, device=DEV)
    logits[1, 5] = float("nan")
    for scoring in ("softmax", "sigmoid"):
        w, ids = route_gpu(logits, 3, scoring=scoring, renormalize=True)
        w_ref, ids_ref = route_reference(logits, 3, scoring=scoring, renormalize=True)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12, equal_nan=True)


def test_route_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    logits = torch.randn(77, 128, device=DEV).bfloat16()
    w, ids = route_gpu(cupy.from_dlpack(logits), 8, scoring="softmax", renormalize=True)
    assert isinstance(w, cupy.ndarray) and isinstance(ids, cupy.ndarray)
    w_ref, ids_ref = route_reference(logits, 8, scoring="softmax", renormalize=True)
    assert torch.equal(torch.from_dlpack(ids), ids_ref)
    torch.testing.assert_close(torch.from_dlpack(w), w_ref, rtol=1e-6, atol=1e-12)


def test_route_cuda_graph_replay_with_new_logits():
    from cute_moe.plan import make_plan, plan_reference

    T, E, k = 1024, 256, 8
    kw = dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4, routed_scaling_factor=2.5,
              correction_bias=torch.randn(E, device=DEV) * 0.1)
    static = torch.randn(T, E, device=DEV).bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile and load the kernels outside the capture
        route_gpu(static, k, **kw)
        make_plan(torch.zeros(T, k, dtype=torch.int32, device=DEV), E, block_m=128)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, ids = route_gpu(static, k, **kw)
        plan = make_plan(ids, E, block_m=128)
    for _ in range(3):
        static.copy_(torch.randn(T, E, device=DEV).bfloat16())
        g.replay()
        torch.cuda.synchronize()
        w_ref, ids_ref = route_reference(static, k, **kw)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-12)
        ref = plan_reference(ids_ref, E, block_m=128)
        assert torch.equal(plan.row_src, ref.row_src) and torch.equal(plan.expert_of_block, ref.expert_of_block)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=33), ValueError, "top_k"),
    (dict(scoring="relu"), ValueError, "scoring"),
    (dict(num_groups=3, topk_groups=1), ValueError, "num_groups"),
    (dict(num_groups=4), ValueError, "topk_groups"),
    (dict(topk_groups=2), ValueError, "topk_groups"),
    (dict(num_groups=8, topk_groups=1, top_k=9), ValueError, "top_k"),
    (dict(correction_bias=torch.zeros(3)), ValueError, "correction_bias"),
])
def test_route_validation(kwargs, err, match):
    logits = torch.randn(4, 64, device=DEV)
    kwargs = {"top_k": 2, **kwargs}
    if isinstance(kwargs.get("correction_bias"), torch.Tensor):
        kwargs["correction_bias"] = kwargs["correction_bias"].to(DEV)
    with pytest.raises(err, match=match):
        route_gpu(logits, **kwargs)
    with pytest.raises(ValueError, match="CUDA"):
        route_gpu(logits.cpu(), 2)
    with pytest.raises(TypeError, match="router_logits"):
        route_gpu(logits.half().to(torch.float64), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("num_experts, hidden", [(8, 4096), (256, 7168), (128, 2880), (60, 72)])
def test_router_logits_match_float64(dtype, num_tokens, num_experts, hidden):
    """Our one-token router kernel (H <= 4096) and the torch.mm path: every float32 logit within
    float32 summation error of a float64 reference; two calls bitwise equal."""
    x = torch.randn(num_tokens, hidden, device=DEV).to(dtype)
    w = (torch.randn(num_experts, hidden, device=DEV) * hidden**-0.5).to(dtype)
    got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (num_tokens, num_experts)
    want = x.double() @ w.double().T
    scale = (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - want).abs() <= 1e-5 * scale).all()
    assert torch.equal(got, router_logits(x, w))


def test_router_logits_strided_and_unaligned_views():
    base = torch.randn(1, 2064, device=DEV).bfloat16()
    wbase = torch.randn(128, 2064, device=DEV).bfloat16()
    for x, w in ((base[:, :2048], wbase[:, :2048]), (base[:, 8:2056], wbase[:, 8:2056]),  # strided, aligned
                 (base[:, 1:2049], wbase[:, :2048]), (base[:, :2048], wbase[:, 1:2049])):  # unaligned
        torch.testing.assert_close(router_logits(x, w), x.float() @ w.float().T, rtol=1e-5, atol=1e-4)
