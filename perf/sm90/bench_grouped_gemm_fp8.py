"""fp8 grouped GEMM on Hopper: each scaling mode vs our bf16 kernel and torch._scaled_grouped_mm.

    python -m perf.sm90.bench_grouped_gemm_fp8 [--tokens 64,1024,8192]

Per reference shape and token count, with random top-k routing: GEMM1 (+SwiGLU) and GEMM2 times for
our bf16 kernel, our fp8 kernel with per-tensor, per-token x per-channel and blockwise (1x128 x
128x128) scales, and torch._scaled_grouped_mm (rowwise scales, no fused activation) where this torch
runs it. Operands are pre-quantized (activation quantization is not timed here). CUDA-graph timing,
every GEMM pair timed in turn for ROUNDS rounds (medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import torch

from cute_moe import quant
from cute_moe.reference import gated_activation_reference
from cute_moe.gemm import grouped_gemm
from cute_moe.gemm.config import pick_config
from cute_moe.layer import gemm_weight_scale
from perf.common import expert_weights, interleaved_ms, quantize_experts, select_shapes, speedup_plot, write_results
from perf.sm90.bench_grouped_gemm import rel_err, routing_offsets

# block: the shipped blockwise config; block_serial / block_overlap force GemmConfig.overlap_promotion
# off / on
MODES = ("tensor", "token", "block", "block_serial", "block_overlap")
ROUNDS = 3  # every GEMM pair timed in turn, medians reported


QUANT_MODES = {"tensor": "per_tensor", "token": "per_token", "block": "blockwise"}


def quantize_weights(mode: str, w1: torch.Tensor, w2: torch.Tensor):
    """((w1 q, scale), (w2 q, scale)) fp8 with scales in the kernel's layout (the layer's re-layout)."""
    q = quantize_experts(w1, w2, QUANT_MODES[mode])
    return ((q.w1_q, gemm_weight_scale(q.w1_scale, q.mode)), (q.w2_q, gemm_weight_scale(q.w2_scale, q.mode)))


def quantize_act(mode: str, x: torch.Tensor):
    """(q [M, K] fp8, scale in the kernel's layout) for ``mode``."""
    if mode == "tensor":
        q, s = quant.quantize_per_tensor(x)
        return q, s.reshape(1)
    if mode == "token":
        q, s = quant.quantize_per_token(x)
        return q, s.reshape(-1).contiguous()
    q, s = quant.quantize_blockwise_act(x)
    return q, s.T.contiguous()


def dequant_act(mode: str, q: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float32 rows ``rows`` of an activation quantized by :func:`quantize_act` (kernel scale layout)."""
    qr = q[rows].float()
    if mode == "tensor":
        return qr * scale
    if mode == "token":
        return qr * scale[rows, None]
    return quant.dequantize_blockwise_act(q[rows], scale[:, rows].T.contiguous())


def dequant_weight(mode: str, q: torch.Tensor, scale: torch.Tensor, e: int, gated: bool) -> torch.Tensor:
    """float32 weights of expert ``e`` from :func:`quantize_weights`' (q, kernel-layout scale); ``gated``: w1."""
    if mode == "tensor":
        return q[e].float() * scale[e]
    if mode == "token":
        return q[e].float() * scale[e][:, None]
    return quant.dequantize_blockwise_weight(q[e:e + 1], scale[e:e + 1], gated=gated)[0]


def sampled_err(mode, xq, sx, q1, s1, aq, sa, q2, s2, out1, out2, cu, experts=4, rows_per_expert=64) -> float:
    """max over GEMM1 (+SwiGLU) and GEMM2 of the relative Frobenius error, on up to ``rows_per_expert``
    rows of each of the ``experts`` busiest experts, against float32 on the dequantized operands (the
    issue's accuracy bound, < 2e-2); sampled because dequantizing every expert of DeepSeek-V3 in float32
    would take 30 GB."""
    counts = cu[1:] - cu[:-1]
    errs = []
    for e in counts.topk(experts).indices.tolist():
        start, n = int(cu[e]), min(int(counts[e]), rows_per_expert)
        rows = torch.arange(start, start + n, device=cu.device)
        h = dequant_act(mode, xq, sx, rows) @ dequant_weight(mode, q1, s1, e, True).T
        ref1 = gated_activation_reference(h, "silu")
        ref2 = dequant_act(mode, aq, sa, rows) @ dequant_weight(mode, q2, s2, e, False).T
        errs += [(rel_err(out1[rows], ref1), rel_err(out2[rows], ref2))]
    return max(max(p) for p in errs)


def torch_scaled(x_q, sx, w_q, sw, offs):
    """torch._scaled_grouped_mm with rowwise scales (per-token x per-channel)."""
    return torch._scaled_grouped_mm(x_q, w_q.transpose(1, 2), sx, sw, offs=offs, out_dtype=torch.bfloat16)


def bench_shape(shape, tokens_list, modes=MODES) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    qw = {m: quantize_weights(m, w1, w2) for m in QUANT_MODES}
    qw["block_serial"] = qw["block_overlap"] = qw["block"]
    print(f"{shape.name}: weights quantized", flush=True)
    rows = []
    for t in tokens_list:
        cu = routing_offsets(t, e, k)
        m = t * k
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        a2 = torch.randn(m, i, device="cuda", dtype=torch.bfloat16)
        ref1 = grouped_gemm(x, w1, cu, activation="silu")
        ref2 = grouped_gemm(a2, w2, cu)
        # every GEMM pair (bf16, each fp8 mode, torch's rowwise fp8) is checked, then all are timed in
        # turn for ROUNDS rounds (medians): clock drift over the run falls on all of them alike
        fns = {"bf16_1": lambda: grouped_gemm(x, w1, cu, activation="silu"), "bf16_2": lambda: grouped_gemm(a2, w2, cu)}
        row = {"shape": shape.name, "T": t}
        for mode in modes:
            t0 = time.perf_counter()
            (q1, s1), (q2, s2) = qw[mode]
            xq, sx = quantize_act(mode.split("_")[0], x)
            aq, sa = quantize_act(mode.split("_")[0], a2)
            c1 = c2 = None
            if mode in ("block_serial", "block_overlap"):
                flags = dict(overlap_promotion=mode == "block_overlap")
                c1 = dataclasses.replace(pick_config(m, 2 * i, h, e, True, blockwise=True), **flags)
                c2 = dataclasses.replace(pick_config(m, h, i, e, False, blockwise=True), **flags)
            g1 = functools.partial(grouped_gemm, xq, q1, cu, activation="silu", a_scale=sx, b_scale=s1, config=c1)
            g2 = functools.partial(grouped_gemm, aq, q2, cu, a_scale=sa, b_scale=s2, config=c2)
            out1, out2 = g1(), g2()
            row[f"{mode}_err_vs_bf16"] = max(rel_err(out1, ref1), rel_err(out2, ref2))
            row[f"{mode}_err_vs_dequantized"] = sampled_err(mode.split("_")[0], xq, sx, q1, s1, aq, sa,
                                                            q2, s2, out1, out2, cu)
            torch.cuda.synchronize()
            print(f"  T={t} {mode}: compile+check {time.perf_counter() - t0:.1f}s", flush=True)
            fns[f"{mode}_1"], fns[f"{mode}_2"] = g1, g2
        (q1, s1), (q2, s2) = qw["token"]
        xq, sx = quantize_act("token", x)
        aq, sa = quantize_act("token", a2)
        offs = cu[1:]
        try:
            torch_scaled(xq, sx, q1, s1, offs)
            fns["torch_1"] = functools.partial(torch_scaled, xq, sx, q1, s1, offs)
            fns["torch_2"] = functools.partial(torch_scaled, aq, sa, q2, s2, offs)
        except (RuntimeError, NotImplementedError) as ex:
            row["torch_note"] = str(ex).splitlines()[0][:120]
        ms = interleaved_ms(fns, rounds=ROUNDS, warmup=2, rep=10, graph=True, calls_per_graph=5)
        bf16_ms = row["bf16_ms"] = ms["bf16_1"] + ms["bf16_2"]
        for mode in modes:
            row[f"{mode}_ms"] = ms[f"{mode}_1"] + ms[f"{mode}_2"]
            row[f"{mode}_speedup_vs_bf16"] = bf16_ms / row[f"{mode}_ms"]
        row["torch_scaled_ms"] = ms["torch_1"] + ms["torch_2"] if "torch_1" in ms else None
        if row["torch_scaled_ms"] is not None and "token" in modes:
            row["token_speedup_vs_torch"] = row["torch_scaled_ms"] / row["token_ms"]
        row["speedup_vs_torch"] = row.get("token_speedup_vs_torch") or 0.0
        rows.append(row)
        print(f"{shape.name:14s} T={t:5d} bf16 {bf16_ms:7.3f} | " + " | ".join(
            f"{md} {row[f'{md}_ms']:7.3f} (x{row[f'{md}_speedup_vs_bf16']:.2f}, err {row[f'{md}_err_vs_dequantized']:.1e})"
            for md in modes if f"{md}_ms" in row) + f" | torch rowwise {row['torch_scaled_ms'] or float('nan'):7.3f}", flush=True)
    del w1, w2, qw
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,1024,8192")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    args = ap.parse_args(argv)
    modes = tuple(args.modes.split(","))
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: expected a subset of {MODES}, got {args.modes!r}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_grouped_gemm_fp8 needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    rows = []
    for shape in select_shapes(args.shapes):
        rows += bench_shape(shape, [int(t) for t in args.tokens.split(",")], modes)
    write_results(
        "sm90_grouped_gemm_fp8", rows,
        {"title": "sm90 fp8 grouped GEMM (GEMM1+SwiGLU and GEMM2): scaling modes vs bf16 and torch._scaled_grouped_mm"},
        md_columns=["shape", "T", "bf16_ms", "tensor_ms", "token_ms", "block_ms", "block_serial_ms", "block_overlap_ms",
                    "block_speedup_vs_bf16", "block_serial_speedup_vs_bf16", "block_overlap_speedup_vs_bf16",
                    "token_speedup_vs_bf16", "torch_scaled_ms", "token_speedup_vs_torch", "block_err_vs_bf16",
                    "tensor_err_vs_dequantized", "token_err_vs_dequantized", "block_err_vs_dequantized"],
        plot=speedup_plot("torch._scaled_grouped_mm time / ours (per-token fp8)",
                          "fp8 per-token grouped GEMM vs torch._scaled_grouped_mm"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
