"""The one-kernel decode path (cute_moe.decode, kernels/moe_decode.cu) vs the float32 reference (GPU)."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe import decode
from cute_moe.reference import experts_reference
from gpu_checks import needs_sm90, rel_err

pytestmark = pytest.mark.gpu


def _weights(e, h, i, bias=False, dtype=torch.bfloat16, bias_dtype=torch.bfloat16):
    w1 = (torch.randn(e, 2 * i, h, device="cuda") * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device="cuda") * i**-0.5).to(dtype)
    b1 = torch.randn(e, 2 * i, device="cuda").to(bias_dtype) if bias else None
    b2 = torch.randn(e, h, device="cuda").to(bias_dtype) if bias else None
    return w1, w2, b1, b2


def _captured(call) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``call`` (run once first, so its kernels are compiled and its memo filled)."""
    call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return g


@pytest.fixture
def calls(monkeypatch):
    """Counts launches of the decode kernel (so a test knows which path ran): "n" of the experts
    kernel (decode.run_experts), "moe" of the kernel that also routes (decode.run_moe), whether the
    call came through the checks or the API's per-signature memo."""
    count = {"n": 0, "moe": 0}

    def counter(key, run):
        def counted(*args, **kwargs):
            result = run(*args, **kwargs)
            count[key] += result is not None
            return result
        return counted

    monkeypatch.setattr(decode, "run_experts", counter("n", decode.run_experts))
    monkeypatch.setattr(decode, "run_moe", counter("moe", decode.run_moe))
    monkeypatch.setattr(decode, "MAX_TOKENS", 8)
    return count


def _valid_reference(x, w1, w2, weights, ids, num_experts, **kw):
    """experts_reference with dropped ids (outside [0, E)) as weight-0 slots of expert 0."""
    dropped = (ids < 0) | (ids >= num_experts)
    return experts_reference(x, w1, w2, weights.masked_fill(dropped, 0), ids.masked_fill(dropped, 0), **kw)


@needs_sm90
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("activation", ["silu", "gelu", "swiglu_oai"])
def test_decode_matches_reference(calls, tokens, activation):
    e, k, h, i = 16, 4, 200, 72  # H, I multiples of 8 but not of the 256-element row step
    w1, w2, b1, b2 = _weights(e, h, i, bias=activation == "swiglu_oai")
    x = torch.randn(tokens, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(tokens, e, device="cuda"), k, renormalize=True)
    out = torch.full((tokens, h), float("nan"), device="cuda", dtype=torch.bfloat16)
    cute_moe.fused_moe(x, w1, w2, weights, ids, activation=activation, w1_bias=b1, w2_bias=b2, out=out,
                       backend="cute")
    assert calls["n"] == 1
    ref = experts_reference(x, w1, w2, weights, ids, activation=activation, w1_bias=b1, w2_bias=b2)
    assert rel_err(out, ref) < 1e-2


@needs_sm90
@pytest.mark.parametrize("case", ["repeated_ids", "dropped_ids", "one_expert", "all_slots_one_expert", "all_dropped"])
def test_decode_ragged_routing(calls, case):
    e, k, h, i, t = 8, 4, 256, 128, 5
    w1, w2, _, _ = _weights(e, h, i)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    weights = torch.rand(t, k, device="cuda")
    ids = torch.randint(0, e, (t, k), device="cuda", dtype=torch.int32)
    if case == "repeated_ids":
        ids[:, 1] = ids[:, 0]
    elif case == "dropped_ids":
        ids[0, :] = -1
        ids[1, 2] = e
        ids[3, 0] = -5
    elif case == "one_expert":
        ids[:, 0] = 3
    elif case == "all_slots_one_expert":  # more members than the kernel's token bound
        ids.fill_(6)
    else:
        ids.fill_(-1)
    out = torch.full((t, h), float("nan"), device="cuda", dtype=torch.bfloat16)
    cute_moe.fused_moe(x, w1, w2, weights, ids, out=out, backend="cute")
    assert calls["n"] == 1
    ref = _valid_reference(x, w1, w2, weights, ids, e, activation="silu")
    if case == "all_dropped":
        assert (out == 0).all()
    elif case == "dropped_ids":
        assert (out[0] == 0).all()  # every slot dropped: nothing added
        assert rel_err(out[1:], ref[1:]) < 1e-2
    else:
        assert rel_err(out, ref) < 1e-2


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_extras_dtypes(calls, dtype):
    """fp16, int64 ids, bf16 router weights, float32 biases and shared output."""
    e, k, h, i, t = 32, 8, 512, 256, 4
    w1, w2, b1, b2 = _weights(e, h, i, bias=True, dtype=dtype, bias_dtype=torch.float32)
    x = torch.randn(t, h, device="cuda").to(dtype)
    weights, ids = cute_moe.route(torch.randn(t, e, device="cuda"), k)
    weights, ids = weights.to(torch.bfloat16), ids.long()
    shared = torch.randn(t, h, device="cuda")
    out = cute_moe.fused_moe(x, w1, w2, weights, ids, activation="gelu", w1_bias=b1, w2_bias=b2,
                             shared_output=shared, backend="cute")
    assert calls["n"] == 1 and out.dtype == dtype
    ref = experts_reference(x, w1, w2, weights, ids, activation="gelu", w1_bias=b1, w2_bias=b2, shared_output=shared)
    assert rel_err(out, ref) < 1e-2


@needs_sm90
def test_decode_equals_staged_and_is_deterministic(calls, monkeypatch):
    e, k, h, i, t = 64, 8, 1024, 384, 3
    w1, w2, _, _ = _weights(e, h, i)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
    a = cute_moe.fused_moe(x, w1, w2, weights, ids, backend="cute")
    b = cute_moe.fused_moe(x, w1, w2, weights, ids, backend="cute")
    assert calls["n"] == 2 and torch.equal(a, b)
    monkeypatch.setattr(decode, "MAX_TOKENS", 0)
    staged = cute_moe.fused_moe(x, w1, w2, weights, ids, backend="cute")
    assert calls["n"] == 2
    assert rel_err(a, staged) < 1e-2


@needs_sm90
@pytest.mark.parametrize("config", [None, decode.DecodeConfig(12), decode.DecodeConfig(14), decode.DecodeConfig(22),
                                    decode.DecodeConfig(24), decode.DecodeConfig(8, 2048, 3)])
def test_decode_reference_shape_qwen3(calls, monkeypatch, config):
    """Qwen3-30B-A3B's expert sizes at T=1 (E reduced to 32), in every launch shape the bench times."""
    monkeypatch.setattr(decode, "CONFIG", config)
    e, k, h, i = 32, 8, 2048, 768
    w1, w2, _, _ = _weights(e, h, i)
    for seed in range(3):
        x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
        weights, ids = cute_moe.route(torch.randn(1, e, device="cuda"), k, renormalize=True)
        out = torch.full((1, h), float("nan"), device="cuda", dtype=torch.bfloat16)
        cute_moe.fused_moe(x, w1, w2, weights, ids, out=out, backend="cute")
        assert rel_err(out, experts_reference(x, w1, w2, weights, ids, activation="silu")) < 1e-2
    assert calls["n"] == 3


@needs_sm90
def test_decode_cuda_graph_replay_with_new_routing(calls):
    e, k, h, i, t = 32, 4, 2880, 288, 2  # GPT-OSS-like H, swiglu_oai with biases
    w1, w2, b1, b2 = _weights(e, h, i, bias=True)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
    out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)
    ws = cute_moe.Workspace()
    kw = dict(activation="swiglu_oai", w1_bias=b1, w2_bias=b2, out=out, workspace=ws, backend="cute")
    g = _captured(lambda: cute_moe.fused_moe(x, w1, w2, weights, ids, **kw))
    assert calls["n"] == 2
    for _ in range(3):
        new_w, new_ids = cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        x.copy_(torch.randn(t, h, device="cuda"))
        out.fill_(float("nan"))
        ws._buf.fill_(255)  # poison the activations' scratch: NaN bf16
        g.replay()
        torch.cuda.synchronize()
        ref = experts_reference(x, w1, w2, weights, ids, activation="swiglu_oai", w1_bias=b1, w2_bias=b2)
        assert rel_err(out, ref) < 1e-2


@needs_sm90
def test_moe_decode_one_kernel_cupy(calls):
    cp = pytest.importorskip("cupy")
    e, k, h, i = 16, 2, 256, 128
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
    out = cute_moe.moe(cp.from_dlpack(x), cp.from_dlpack(router), cp.from_dlpack(w1), cp.from_dlpack(w2), k,
                       renormalize=True, backend="cute")
    assert isinstance(out, cp.ndarray) and calls["moe"] == 1 and calls["n"] == 0
    ref = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")
    assert rel_err(torch.from_dlpack(out), ref) < 1e-2


@needs_sm90
def test_nan_in_x_propagates_to_that_token(calls):
    e, k, h, i, t = 8, 2, 128, 64, 3
    w1, w2, _, _ = _weights(e, h, i)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    x[1, 5] = float("nan")
    weights, ids = cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
    out = cute_moe.fused_moe(x, w1, w2, weights, ids, activation="swiglu_oai", backend="cute")
    assert calls["n"] == 1
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@needs_sm90
def test_refused_cooperative_launch_falls_back_to_the_staged_pipeline(calls, monkeypatch):
    """When the driver refuses the cooperative launch (e.g. another context holds the SMs) the layer
    runs the staged pipeline instead: same result, no error."""
    from cute_moe import _nvrtc

    monkeypatch.setattr(_nvrtc.CooperativeLaunch, "__call__", lambda self, *args: False)
    e, k, h, i = 8, 2, 256, 128
    w1, w2, _, _ = _weights(e, h, i)
    x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
    weights, ids = cute_moe.route(torch.randn(1, e, device="cuda"), k, renormalize=True)
    out = torch.full((1, h), float("nan"), device="cuda", dtype=torch.bfloat16)
    cute_moe.fused_moe(x, w1, w2, weights, ids, out=out, backend="cute")
    assert calls["n"] == 0 and cute_moe.last_backend() == "cute"
    assert rel_err(out, experts_reference(x, w1, w2, weights, ids, activation="silu")) < 1e-2


# (E, k, routing options, router weight dtype): the routing configurations the decode kernel routes
ROUTED = {
    "softmax_renorm": (16, 4, dict(renormalize=True), torch.bfloat16),
    "softmax_e60_fp32_router": (60, 4, dict(), torch.float32),
    "deepseek_v3": (256, 8, dict(scoring="sigmoid", num_groups=8, topk_groups=4, renormalize=True,
                                 routed_scaling_factor=2.5, correction_bias=torch.float32), torch.bfloat16),
    "groups_of_64_bf16_bias": (128, 6, dict(scoring="sigmoid", num_groups=2, topk_groups=1,
                                            correction_bias=torch.bfloat16), torch.float16),
    "sigmoid_top1": (32, 1, dict(scoring="sigmoid"), torch.bfloat16),
}


def _routing(name):
    e, k, opts, rdt = ROUTED[name]
    opts = dict(opts)
    if "correction_bias" in opts:
        opts["correction_bias"] = (torch.rand(e, device="cuda") * 0.1).to(opts["correction_bias"])
    return e, k, opts, rdt


@needs_sm90
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
@pytest.mark.parametrize("name", list(ROUTED))
def test_moe_decode_routes_in_kernel_and_matches_reference(calls, name, tokens):
    """moe at decode sizes: router, routing and experts in one kernel, vs the reference layer."""
    e, k, opts, rdt = _routing(name)
    h, i = 264, 80  # not multiples of the routing slices
    w1, w2, _, _ = _weights(e, h, i)
    for _ in range(2):  # fresh inputs each check
        router = torch.randn(e, h, device="cuda").to(rdt)
        x = torch.randn(tokens, h, device="cuda").to(torch.bfloat16)
        shared = torch.randn(tokens, h, device="cuda").to(torch.bfloat16)
        out = torch.full((tokens, h), float("nan"), device="cuda", dtype=torch.bfloat16)
        cute_moe.moe(x, router, w1, w2, k, **opts, shared_output=shared, out=out, backend="cute")
        ref = cute_moe.moe(x, router, w1, w2, k, **opts, shared_output=shared, backend="reference")
        assert rel_err(out, ref) < 1e-2
    assert calls["moe"] == 2 and calls["n"] == 0


@needs_sm90
def test_moe_decode_hot_expert_and_tied_logits(calls):
    """One expert's router row dominates and every other logit ties at 0: ties go to the lower ids,
    as in the reference; the result is bitwise the same on every call."""
    e, k, h, i, t = 64, 4, 512, 128, 3
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.zeros(e, h, device="cuda", dtype=torch.bfloat16)
    x = torch.rand(t, h, device="cuda").to(torch.bfloat16)
    router[37] = 1.0
    a = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="cute")
    b = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="cute")
    ref = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")
    assert calls["moe"] == 2 and torch.equal(a, b)
    assert rel_err(a, ref) < 1e-2


@needs_sm90
def test_moe_decode_reference_shapes_at_t1(calls):
    """DeepSeek-V3's and GPT-OSS-120B's router and expert sizes at T=1 (E and I reduced)."""
    for e, k, h, i, opts, act in [
            (256, 8, 7168, 256, dict(scoring="sigmoid", num_groups=8, topk_groups=4, renormalize=True,
                                     routed_scaling_factor=2.5), "silu"),
            (128, 4, 2880, 360, dict(renormalize=True), "swiglu_oai")]:
        w1, w2, b1, b2 = _weights(e, h, i, bias=act == "swiglu_oai")
        router = (torch.randn(e, h, device="cuda") * h**-0.5).to(torch.bfloat16)
        if "num_groups" in opts:
            opts["correction_bias"] = torch.rand(e, device="cuda") * 0.1
        x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
        out = cute_moe.moe(x, router, w1, w2, k, **opts, activation=act, w1_bias=b1, w2_bias=b2, backend="cute")
        ref = cute_moe.moe(x, router, w1, w2, k, **opts, activation=act, w1_bias=b1, w2_bias=b2, backend="reference")
        assert rel_err(out, ref) < 1e-2
    assert calls["moe"] == 2


@needs_sm90
def test_moe_decode_routing_it_cannot_fuse_takes_the_routing_kernel(calls):
    """Groups of 8 experts (not a multiple of 32) route in their own kernel, then the experts kernel."""
    e, k, h, i = 64, 4, 256, 128
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    x = torch.randn(2, h, device="cuda").to(torch.bfloat16)
    opts = dict(scoring="sigmoid", num_groups=8, topk_groups=3, renormalize=True)
    out = cute_moe.moe(x, router, w1, w2, k, **opts, backend="cute")
    assert calls["moe"] == 0 and calls["n"] == 1
    assert rel_err(out, cute_moe.moe(x, router, w1, w2, k, **opts, backend="reference")) < 1e-2


@needs_sm90
def test_moe_decode_cuda_graph_replay_with_new_inputs(calls):
    """A captured moe call routes each replay's new x itself (workspace scratch, poisoned)."""
    e, k, h, i, t = 64, 8, 1024, 192, 2
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)
    ws = cute_moe.Workspace()
    kw = dict(renormalize=True, out=out, workspace=ws, backend="cute")
    g = _captured(lambda: cute_moe.moe(x, router, w1, w2, k, **kw))
    assert calls["moe"] == 2
    for _ in range(3):
        x.copy_(torch.randn(t, h, device="cuda"))
        out.fill_(float("nan"))
        ws._buf.fill_(255)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")) < 1e-2


@needs_sm90
def test_moe_decode_refused_cooperative_launch_falls_back(calls, monkeypatch):
    from cute_moe import _nvrtc

    monkeypatch.setattr(_nvrtc.CooperativeLaunch, "__call__", lambda self, *args: False)
    e, k, h, i = 8, 2, 256, 128
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
    out = cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="cute")
    assert calls["moe"] == 0 and calls["n"] == 0 and cute_moe.last_backend() == "cute"
    assert rel_err(out, cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")) < 1e-2


@needs_sm90
def test_bound_moe_equals_moe_and_replays_in_a_cuda_graph(calls):
    """bind_moe(...)(x, out=out) gives moe's output bit for bit at T = 1 and 2 (fresh x each call,
    out poisoned), through the decode kernel; captured in a CUDA graph it routes each replay's new x."""
    e, k, h, i = 64, 8, 1024, 192
    w1, w2, _, _ = _weights(e, h, i)
    router = torch.randn(e, h, device="cuda").to(torch.bfloat16)
    ws = cute_moe.Workspace()
    bound = cute_moe.bind_moe(router, w1, w2, k, renormalize=True, workspace=ws, backend="cute")
    for t in (1, 2, 1, 2):
        x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
        out = torch.full((t, h), float("nan"), device="cuda", dtype=torch.bfloat16)
        assert bound(x, out=out) is out
        assert torch.equal(out, cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="cute"))
        assert rel_err(out, cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="reference")) < 1e-2
    assert calls["moe"] == 8
    x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
    out = torch.empty(1, h, device="cuda", dtype=torch.bfloat16)
    g = _captured(lambda: bound(x, out=out))
    for _ in range(3):
        x.copy_(torch.randn(1, h, device="cuda"))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, cute_moe.moe(x, router, w1, w2, k, renormalize=True, backend="cute"))
