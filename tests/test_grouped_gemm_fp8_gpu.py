"""fp8 (e4m3) Hopper grouped GEMM: per-tensor, per-token x per-channel and blockwise scales vs a
float32 reference computed on the dequantized inputs (GPU)."""

from __future__ import annotations

import pytest
import torch

from cute_moe import quant
from cute_moe.reference import gated_activation_reference
from gpu_checks import needs_sm90, rel_err

pytestmark = pytest.mark.gpu

TOL = 2e-2
# 1, 3, 64, 129, 192: a 128-row tile whose second warpgroup has no rows (it skips the WGMMAs); 65, 127: one or more
RAGGED = [0, 1, 127, 129, 256, 0, 3, 64, 65, 192]


def quantized_operands(mode: str, a: torch.Tensor, b: torch.Tensor, gated: bool = False):
    """(qa, a_scale, qb, b_scale, dequantized a, dequantized b) in the kernel's scale layouts; a gated
    b ([gate | up]) is blocked per half in block mode."""
    if mode == "tensor":
        qa, sa = quant.quantize_per_tensor(a)
        qb, sb = quant.quantize_per_expert(b)
        return qa, sa.reshape(1), qb, sb.reshape(-1).contiguous(), quant.dequantize(qa, sa), quant.dequantize(qb, sb)
    if mode == "token":
        qa, sa = quant.quantize_per_token(a)
        qb, sb = quant.quantize_per_channel(b)
        return (qa, sa.reshape(-1).contiguous(), qb, sb.squeeze(-1).contiguous(),
                quant.dequantize(qa, sa), quant.dequantize(qb, sb))
    qa, sa = quant.quantize_blockwise_act(a)
    qb, sb = (quant.quantize_blockwise_gated_weight if gated else quant.quantize_blockwise_weight)(b)
    return (qa, sa.T.contiguous(), qb, sb.contiguous(),
            quant.dequantize_blockwise_act(qa, sa), quant.dequantize_blockwise_weight(qb, sb))


def _reference(a, b, cu, activation):
    cu_l, outs = cu.tolist(), []
    for e in range(b.shape[0]):
        h = a[cu_l[e]:cu_l[e + 1]] @ b[e].T
        outs.append(gated_activation_reference(h, activation) if activation != "none" else h)
    return torch.cat(outs)


def _config(mode: str, tile_m: int):
    """"block_overlap": blockwise with GemmConfig.overlap_promotion; "_c2": 2-CTA clusters; "_dyn": dynamic
    tile scheduling (128-row tiles)."""
    from cute_moe.gemm import GemmConfig

    return GemmConfig(tile_m, 256 if mode.split("_")[0] in ("tensor", "token") else 128,
                      cluster_m=2 if mode.endswith("_c2") else 1, overlap_promotion=mode.startswith("block_overlap"),
                      dynamic=mode.endswith("_dyn") and tile_m == 128)


@needs_sm90
@pytest.mark.parametrize("mode", ["tensor", "token", "block", "block_overlap", "block_overlap_c2", "block_dyn",
                                  "block_overlap_dyn", "token_dyn"])
@pytest.mark.parametrize("activation", ["none", "silu", "swiglu_oai"])
@pytest.mark.parametrize("tile_m", [64, 128])
def test_fp8_ragged(mode, activation, tile_m):
    from cute_moe.gemm import grouped_gemm

    gated = activation != "none"
    # K, N and I = N/2 not multiples of 128: ragged last scale blocks (GPT-OSS: H = I = 2880)
    n, k = (2 * 160, 320) if gated else (320, 320)
    e = len(RAGGED)
    a = torch.randn(sum(RAGGED), k, device="cuda")
    b = torch.randn(e, n, k, device="cuda") / k**0.5
    qa, sa, qb, sb, da, db = quantized_operands(mode.split("_")[0], a, b, gated)
    cu = torch.tensor([0] + RAGGED, device="cuda").cumsum(0).to(torch.int32)
    out = torch.full((a.shape[0], n // 2 if gated else n), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm(qa, qb, cu, activation=activation, a_scale=sa, b_scale=sb, out=out, config=_config(mode, tile_m))
    ref = _reference(da, db, cu, activation)
    err = rel_err(out, ref)
    err_vs_unquantized = rel_err(out, _reference(a, b, cu, activation))
    print(f"fp8 {mode} {activation} tile_m={tile_m}: err vs dequantized {err:.2e}, vs unquantized {err_vs_unquantized:.2e}")
    assert err < TOL


@needs_sm90
@pytest.mark.parametrize("mode", ["tensor", "token"])
@pytest.mark.parametrize("activation, tile_m, tile_n", [("silu", 64, 96), ("none", 64, 160), ("none", 128, 224)])
def test_fp8_in_between_tile_widths(mode, activation, tile_m, tile_n):
    """Tile widths between the powers of two (store subtiles of 16 columns for a 48-wide gated output;
    128x224 is the prefill pick for N = 2880)."""
    from cute_moe.gemm import GemmConfig, grouped_gemm

    gated = activation != "none"
    n, k = (2 * 160, 320) if gated else (320, 320)
    a = torch.randn(sum(RAGGED), k, device="cuda")
    b = torch.randn(len(RAGGED), n, k, device="cuda") / k**0.5
    qa, sa, qb, sb, da, db = quantized_operands(mode, a, b, gated)
    cu = torch.tensor([0] + RAGGED, device="cuda").cumsum(0).to(torch.int32)
    out = torch.full((a.shape[0], n // 2 if gated else n), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm(qa, qb, cu, activation=activation, a_scale=sa, b_scale=sb, out=out, config=GemmConfig(tile_m, tile_n))
    assert rel_err(out, _reference(da, db, cu, activation)) < TOL


@needs_sm90
def test_fp8_scale_shapes_checked():
    from cute_moe.gemm import grouped_gemm

    a = torch.randn(16, 128, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(2, 128, 128, device="cuda").to(torch.float8_e4m3fn)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="a_scale, b_scale"):
        grouped_gemm(a, b, cu)
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm(a, b, cu, a_scale=torch.ones(16, device="cuda"), b_scale=torch.ones(2, device="cuda"))
    with pytest.raises(ValueError, match="a_scale"):
        grouped_gemm(a, b, cu, a_scale=torch.ones(16, 1, device="cuda"), b_scale=torch.ones(2, 1, 1, device="cuda"))


@needs_sm90
@pytest.mark.parametrize("mode", ["tensor", "token", "block", "block_overlap", "block_c2", "block_overlap_c2",
                                  "block_dyn", "block_overlap_dyn", "token_dyn"])
def test_fp8_persistent_many_tiles_per_cta(mode):
    """Several tiles per CTA and more k-tiles than pipeline stages: the pipeline state must carry
    across tiles (a stale state re-reads old stages and deadlocks or corrupts the next tile)."""
    from cute_moe.gemm import grouped_gemm

    n, k, e = 512, 2048, 3
    counts = [3000, 0, 2500]
    a = torch.randn(sum(counts), k, device="cuda")
    b = torch.randn(e, n, k, device="cuda") / k**0.5
    qa, sa, qb, sb, da, db = quantized_operands(mode.split("_")[0], a, b, gated=True)
    cu = torch.tensor([0] + counts, device="cuda").cumsum(0).to(torch.int32)
    out = torch.full((a.shape[0], n // 2), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm(qa, qb, cu, activation="silu", a_scale=sa, b_scale=sb, out=out, config=_config(mode, 128))
    assert rel_err(out, _reference(da, db, cu, "silu")) < TOL
