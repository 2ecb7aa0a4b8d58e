"""The fp8 (``quant=``) MoE layer on the cute backend vs the reference (GPU).

The reference (:func:`cute_moe.reference.experts_reference` with ``quant=``) computes in float32 on
the dequantized weights and the quantized-then-dequantized activations, which is what the fp8 kernels
compute, so the tolerance is tight (2e-2 relative Frobenius error). The error against the bf16 cute
result (the cost of fp8 itself) is printed, not asserted. All layer tests share one shape, bias and
activation so the file compiles few GEMM kernels (GEMM1 + GEMM2 per mode, the bf16 pair, the fp16
pair). The fp8 row quantization kernels are compared bitwise with cute_moe.quant.
"""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe import quant
from cute_moe.gemm.interface import grouped_gemm
from cute_moe.layer import gemm_weight_scale
from cute_moe.permute import permute_fp8, permute_fp8_per_tensor, quantize_fp8
from cute_moe.plan import make_plan
from cute_moe.reference import experts_reference, gated_activation_reference
from routing_data import random_topk_ids
from gpu_checks import needs_sm90, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
MODES = ("per_tensor", "per_token", "blockwise")
E, K, H, I = 8, 2, 256, 128
TOL = 2e-2
# End to end, per-tensor mode: Hopper's fp8 WGMMA accumulates with less than fp32 precision, so GEMM1's
# bf16 output differs from the float32 reference by one bf16 ulp in a few percent of elements; when the
# tensor's largest element is one of them (about one call in ten on these sizes), the per-tensor scale of
# GEMM2's input moves by 2^-8 and about 8% of its fp8 codes by one step: 1.7e-2 to 2.6e-2 measured
# (H200). Per-token and blockwise scales confine that to one row or group. The stage test below checks
# the quantization bitwise on the kernel's own GEMM1 output.
E2E_TOL = {"per_tensor": 4e-2}


def _layer(mode, dtype=torch.bfloat16, seed=0):
    """(w1, w2, w1_bias, w2_bias, QuantizedWeights) of E experts [2I, H] / [H, I] in ``dtype``."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, device=DEV, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEV, generator=g) * I**-0.5).to(dtype)
    b1 = (torch.randn(E, 2 * I, device=DEV, generator=g) * 0.1).to(dtype)
    b2 = (torch.randn(E, H, device=DEV, generator=g) * 0.1).to(dtype)
    return w1, w2, b1, b2, quant.quantize_weights(w1, w2, mode)


def _routing(kind, tokens, seed=0):
    """(topk_weights float32, topk_ids int32) of a routing ``kind``."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind == "one_expert":  # top-1, every token on expert 3
        return torch.rand(tokens, 1, device=DEV, generator=g) + 0.5, torch.full((tokens, 1), 3, dtype=torch.int32,
                                                                                 device=DEV)
    logits = torch.randn(tokens, E, device=DEV, generator=g)
    logits[:, 5] = float("-inf")  # expert 5 gets no token
    return cute_moe.route(logits, K, renormalize=True)


def _check_fp8_call(mode, x, weights, ids, compare_bf16=True):
    """fused_moe(quant=) on cute into a NaN-poisoned out= vs the reference; prints the error vs bf16 cute."""
    w1, w2, b1, b2, qw = _layer(mode, x.dtype)
    out = torch.full_like(x, float("nan"))
    got = cute_moe.fused_moe(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw, out=out, backend="cute")
    assert got is out and cute_moe.last_backend() == "cute"
    ref = experts_reference(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw)
    err = rel_err(out, ref)
    vs_bf16 = ""
    if compare_bf16:
        bf16 = cute_moe.fused_moe(x, w1, w2, weights, ids, w1_bias=b1, w2_bias=b2, backend="cute")
        vs_bf16 = f", vs bf16 cute {rel_err(out, bf16):.2e}"
    print(f"fp8 {mode} {x.dtype} T={x.shape[0]} k={ids.shape[1]}: err vs fp8 reference {err:.2e}{vs_bf16}")
    assert err < E2E_TOL.get(mode, TOL)
    again = cute_moe.fused_moe(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw, backend="cute")
    assert torch.equal(again, out)  # deterministic


@needs_sm90
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens, kind", [(1, "random"), (37, "random"), (200, "random"), (150, "one_expert")])
def test_fp8_layer_matches_reference(mode, tokens, kind):
    """T=1, T not a multiple of any tile, an expert with no token (expert 5), all tokens on one expert."""
    x = torch.randn(tokens, H, device=DEV).to(torch.bfloat16)
    weights, ids = _routing(kind, tokens)
    _check_fp8_call(mode, x, weights, ids)


@needs_sm90
@pytest.mark.parametrize("mode", ("bf16",) + MODES)
@pytest.mark.parametrize("tokens", [1, 37, 200])
def test_overlapped_launches_equal_synchronized_stages(mode, tokens, monkeypatch):
    """Programmatic dependent launch lets each kernel start while the previous one ends, and the GEMMs
    load weights before waiting for it: the layer's output must be bitwise what it is with a device
    synchronize after every stage (nothing overlaps), on fresh inputs each repeat. (The staged
    pipeline at every T: small bf16 calls would otherwise run the one-kernel decode path, which has
    no stages to synchronize.)"""
    from cute_moe import decode, layer

    monkeypatch.setattr(decode, "MAX_TOKENS", 0)

    w1, w2, b1, b2, qw = _layer("per_tensor" if mode == "bf16" else mode)
    for seed in range(5):
        x = torch.randn(tokens, H, device=DEV).to(torch.bfloat16)
        weights, ids = _routing("random", tokens, seed=seed + 1)
        kw = dict(x=x, w1=w1, w2=w2, topk_weights=weights, topk_ids=ids, activation="silu", w1_bias=b1, w2_bias=b2,
                  quant=None if mode == "bf16" else qw, apply_router_weight_on_input=False, shared_output=None)
        overlapped = layer.fused_moe(**kw, out=torch.full_like(x, float("nan")))
        synced = layer.fused_moe(**kw, out=torch.full_like(x, float("nan")),
                                 stage_hook=lambda name: torch.cuda.synchronize())
        assert torch.isfinite(synced.float()).all()
        assert torch.equal(overlapped, synced), f"{mode} T={tokens} seed {seed}"


def _dequantize_act(mode, q, scale):
    if mode == "blockwise":
        return quant.dequantize_blockwise_act(q, scale.T.contiguous())
    return q.float() * (scale.float()[:, None] if mode == "per_token" else scale.float())


@needs_sm90
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", [37, 200])
def test_fp8_layer_stages_match_float32_on_kernel_inputs(mode, tokens):
    """The layer's stages one by one: activation quantization bitwise equal to cute_moe.quant's on the
    same device, each fp8 GEMM within TOL of float32 on the dequantized operands it was given."""
    w1, w2, b1, b2, qw = _layer(mode)
    x = torch.randn(tokens, H, device=DEV).to(torch.bfloat16)
    _, ids = _routing("random", tokens)
    plan = make_plan(ids, E)
    cu, counts = plan.cu_seqlens, plan.counts.tolist()
    scaling = {"per_tensor": "tensor", "per_token": "token", "blockwise": "block"}[mode]
    ref_quant = {"per_tensor": quant.quantize_per_tensor, "per_token": quant.quantize_per_token,
                 "blockwise": quant.quantize_blockwise_act}[mode]

    def check_quant(q, scale, src):
        rq, rs = ref_quant(src)
        assert torch.equal(scale.reshape(-1), (rs.T if mode == "blockwise" else rs).reshape(-1))
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))

    def check_gemm(out, a_dq, w_dq, bias, activation):
        ref = torch.empty(out.shape, device=DEV)
        o = 0
        for e, c in enumerate(counts):
            h = a_dq[o:o + c] @ w_dq[e].T + bias[e].float()
            ref[o:o + c] = h if activation is None else gated_activation_reference(h, activation)
            o += c
        assert rel_err(out, ref) < TOL

    if mode == "per_tensor":
        xq, xs = permute_fp8_per_tensor(x, plan)
    else:
        xq, xs = permute_fp8(x, plan, scaling=scaling)
    check_quant(xq, xs, x[plan.row_src.long() // K])
    h = torch.full((tokens * K, I), float("nan"), device=DEV, dtype=torch.bfloat16)
    grouped_gemm(xq, qw.w1_q, cu, activation="silu", bias=b1, a_scale=xs,
                 b_scale=gemm_weight_scale(qw.w1_scale, mode), out=h)
    check_gemm(h, _dequantize_act(mode, xq, xs), quant.dequantize_weight(qw.w1_q, qw.w1_scale, mode, gated=True), b1, "silu")
    hq, hs = quantize_fp8(h, scaling=scaling, num_rows=cu[E:])
    check_quant(hq, hs, h)
    y = torch.full((tokens * K, H), float("nan"), device=DEV, dtype=torch.bfloat16)
    grouped_gemm(hq, qw.w2_q, cu, bias=b2, a_scale=hs, b_scale=gemm_weight_scale(qw.w2_scale, mode), out=y)
    check_gemm(y, _dequantize_act(mode, hq, hs), quant.dequantize_weight(qw.w2_q, qw.w2_scale, mode, gated=False), b2, None)


@needs_sm90
def test_fp8_blockwise_layer_ragged_scale_blocks():
    """H and I not multiples of 128 (as GPT-OSS's 2880): ragged last 1x128 groups and 128x128 blocks,
    w1's gate and up halves blocked separately."""
    h, i, tokens = 320, 160, 77
    g = torch.Generator(device=DEV).manual_seed(1)
    w1 = (torch.randn(E, 2 * i, h, device=DEV, generator=g) * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, h, i, device=DEV, generator=g) * i**-0.5).to(torch.bfloat16)
    qw = quant.quantize_weights(w1, w2, "blockwise")
    x = torch.randn(tokens, h, device=DEV).to(torch.bfloat16)
    weights, ids = _routing("random", tokens)
    out = torch.full_like(x, float("nan"))
    cute_moe.fused_moe(x, None, None, weights, ids, quant=qw, out=out, backend="cute")
    assert cute_moe.last_backend() == "cute"
    assert rel_err(out, experts_reference(x, None, None, weights, ids, quant=qw)) < TOL


@needs_sm90
def test_fp8_layer_fp16():
    x = torch.randn(45, H, device=DEV).to(torch.float16)
    weights, ids = _routing("random", 45)
    _check_fp8_call("per_token", x, weights, ids, compare_bf16=False)  # GEMMs write fp16


@needs_sm90
@pytest.mark.parametrize("mode", MODES)
def test_fp8_layer_cuda_graph_replay_with_new_inputs(mode):
    tokens = 96
    *_, b1, b2, qw = _layer(mode)
    x = torch.randn(tokens, H, device=DEV).to(torch.bfloat16)
    weights, ids = _routing("random", tokens)
    out = torch.empty_like(x)
    cute_moe.fused_moe(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw, out=out, backend="cute")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cute_moe.fused_moe(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw, out=out, backend="cute")
    for seed, skew, scale in ((1, 0.0, 1.0), (2, 6.0, 30.0), (3, 0.0, 1e-3)):  # new routing and magnitudes
        logits = torch.randn(tokens, E, device=DEV) + skew * torch.arange(E, device=DEV) / E
        new_w, new_ids = cute_moe.route(logits, K, renormalize=True)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        x.copy_(torch.randn(tokens, H, device=DEV) * scale)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = experts_reference(x, None, None, weights, ids, w1_bias=b1, w2_bias=b2, quant=qw)
        assert rel_err(out, ref) < E2E_TOL.get(mode, TOL)  # end to end: see E2E_TOL


@needs_sm90
def test_fp8_moe_cupy_in_cupy_out():
    cp = pytest.importorskip("cupy")
    *_, b1, b2, qw = _layer("blockwise")
    router = torch.randn(E, H, device=DEV).to(torch.bfloat16)
    x = torch.randn(33, H, device=DEV).to(torch.bfloat16)
    out = cute_moe.moe(cp.from_dlpack(x), cp.from_dlpack(router), None, None, K, renormalize=True,
                       w1_bias=cp.from_dlpack(b1), w2_bias=cp.from_dlpack(b2), quant=qw, backend="cute")
    assert isinstance(out, cp.ndarray) and cute_moe.last_backend() == "cute"
    ref = cute_moe.moe(x, router, None, None, K, renormalize=True, w1_bias=b1, w2_bias=b2, quant=qw,
                       backend="reference")
    assert rel_err(torch.from_dlpack(out), ref) < TOL


@needs_sm90
def test_fp8_nn_module_runs_on_cute():
    layer = cute_moe.nn.MoE(H, I, E, K, renormalize=True, bias=True, device=DEV, backend="cute")
    with torch.no_grad():
        layer.w1_bias.normal_(0, 0.1)
        layer.w2_bias.normal_(0, 0.1)
    layer.quantize_("per_token")
    x = torch.randn(3, 17, H, device=DEV).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == x.shape and cute_moe.last_backend() == "cute"
    layer.backend = "reference"
    assert rel_err(out, layer(x)) < TOL


@needs_sm90
def test_fp8_layer_with_debug_checks(monkeypatch):
    """Debug checks also read the per-call activation scales (finite, > 0): valid inputs pass."""
    monkeypatch.setattr(cute_moe.validate, "_debug_checks", True)
    x = torch.randn(20, H, device=DEV).to(torch.bfloat16)
    weights, ids = _routing("random", 20)
    _check_fp8_call("per_tensor", x, weights, ids)


@needs_sm90
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_fp8_bad_weight_scale_raises(bad):
    *_, b1, b2, qw = _layer("per_token")
    w1_scale = qw.w1_scale.clone()
    w1_scale[2, 7, 0] = bad
    bad_qw = quant.QuantizedWeights(qw.w1_q, w1_scale, qw.w2_q, qw.w2_scale, qw.mode)
    x = torch.randn(4, H, device=DEV).to(torch.bfloat16)
    weights, ids = _routing("random", 4)
    with pytest.raises(ValueError, match=r"^quant\.w1_scale: expected finite scales > 0"):
        cute_moe.fused_moe(x, None, None, weights, ids, quant=bad_qw, backend="cute")
    from cute_moe.gemm import grouped_gemm

    xq, xs = quant.quantize_per_token(x.float())
    cu = torch.tensor([0] + [4] * E, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"^b_scale: expected finite scales > 0"):
        grouped_gemm(xq, qw.w1_q, cu, activation="silu", a_scale=xs.reshape(-1), b_scale=w1_scale.squeeze(-1))


# ---- the fp8 row quantization kernels (NVRTC only: no GEMM compiles), bitwise vs cute_moe.quant on the CPU


def _cpu_quantize(x, scaling):
    """(q as uint8, scale in the kernel layout) of x by cute_moe.quant on the CPU."""
    if scaling == "token":
        q, s = quant.quantize_per_token(x.cpu())
        s = s.reshape(-1)
    elif scaling == "block":
        q, s = quant.quantize_blockwise_act(x.cpu())
        s = s.T.contiguous()
    else:
        q, s = quant.quantize_per_tensor(x.cpu())
        s = s.reshape(1)
    return q.view(torch.uint8).to(DEV), s.to(DEV)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scaling", ["token", "block", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, cols, limit", [(1, 16, None), (333, 2880, None), (1000, 4096, 611), (64, 128, 0)])
def test_quantize_fp8_rows(scaling, dtype, rows, cols, limit):
    x = (torch.randn(rows, cols, device=DEV) * torch.rand(rows, 1, device=DEV) * 10).to(dtype)
    x[0, : min(cols, 300)] = 0  # an all-zero group / row
    n = rows if limit is None else limit
    if n < rows:
        x[n:] = float("nan")  # rows past num_rows must not be read (not even by the per-tensor amax)
    num_rows = None if limit is None else torch.tensor([limit, 99], dtype=torch.int32, device=DEV)
    q, s = quantize_fp8(x, scaling=scaling, num_rows=num_rows)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.dtype == torch.float32
    q_ref, s_ref = _cpu_quantize(x[:n], scaling)
    assert torch.equal(q.view(torch.uint8)[:n], q_ref)
    if scaling == "token":
        assert s.shape == (rows,) and torch.equal(s[:n], s_ref)
    elif scaling == "block":
        assert s.shape == (-(-cols // 128), rows) and torch.equal(s[:, :n], s_ref)
    else:
        assert s.shape == (1,) and torch.equal(s, s_ref)
    q2, s2 = quantize_fp8(x, scaling=scaling, num_rows=num_rows)
    assert torch.equal(q2.view(torch.uint8)[:n], q.view(torch.uint8)[:n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_fp8_tensor_nan_propagates_and_cupy():
    x = torch.randn(40, 64, device=DEV).bfloat16()
    x[7, 3] = float("nan")
    _, s = quantize_fp8(x, scaling="tensor")
    assert s.isnan().all()  # like torch's amax
    cp = pytest.importorskip("cupy")
    q, s = quantize_fp8(cp.from_dlpack(x[:6]), scaling="block")
    assert isinstance(q, cp.ndarray) and q.dtype == cp.uint8 and isinstance(s, cp.ndarray)
    with pytest.raises(ValueError, match="^scaling:"):
        quantize_fp8(x, scaling="channel")
    with pytest.raises(ValueError, match="^x: fp8 quantization needs K % 16"):
        quantize_fp8(torch.randn(4, 24, device=DEV), scaling="token")
    with pytest.raises(ValueError, match="^num_rows:"):
        quantize_fp8(x, num_rows=torch.tensor([3], device=DEV))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["flat", "padded", "masked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permute_fp8_per_tensor(layout, dtype):
    T, hidden, k = 77, 2880, 4
    ids = random_topk_ids(T, k, 16, "skewed", device=DEV)
    plan = make_plan(ids, 16, block_m=128, max_m=T)
    x = (torch.randn(T, hidden, device=DEV) * 5).to(dtype)
    q, s = permute_fp8_per_tensor(x, plan, layout=layout)
    q_ref, s_ref = _cpu_quantize(x, "tensor")
    assert s.shape == (1,) and torch.equal(s, s_ref)
    rows = q.view(torch.uint8).reshape(-1, hidden)
    dest = plan.dest_rows(layout).long().reshape(-1)  # (token, slot) -> row
    assert torch.equal(rows[dest], q_ref.repeat_interleave(k, dim=0))
