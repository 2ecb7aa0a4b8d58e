"""Hopper grouped GEMM benchmark: our GEMM1 (+SwiGLU) and GEMM2 vs torch._grouped_mm, same inputs.

    python -m perf.sm90.bench_grouped_gemm [--tokens 1,64,1024,8192] [--sweep]

For each reference shape and token count: random top-k routing, then GEMM1 (x @ w1[e].T with the
silu-gated epilogue; torch's GEMM1 is the plain grouped GEMM without the activation) and GEMM2
(h @ w2[e].T). Reports ms, TFLOP/s and torch/ours speedups, with the dense bf16 8192^3 torch.mm rate
of the same run as the ceiling. Every time is a CUDA-graph replay (device time, no host launch
overhead) for both sides, ours and torch's in turn for ROUNDS rounds (medians). --sweep also times
every tile config and reports the best.
"""

from __future__ import annotations

import argparse
import sys

import torch

from cute_moe.gemm import GemmConfig, grouped_gemm, pick_config
from perf.common import (bench_ms, dense_mm_tflops, expert_weights, interleaved_ms, select_shapes, speedup_plot,
                         write_results)

SWEEP = [GemmConfig(128, 256, 2), GemmConfig(128, 256), GemmConfig(128, 224), GemmConfig(128, 192),
         GemmConfig(128, 128), GemmConfig(64, 256), GemmConfig(64, 128), GemmConfig(64, 64)]
NUM_SMS = 132
ROUNDS = 3  # ours and torch's kernels timed in turn, medians reported


def routing_offsets(tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """cu_seqlens int32 [E+1] of a random softmax top-k routing (randn logits: realistic skew)."""
    ids = torch.randn(tokens, num_experts, device="cuda").topk(top_k, dim=1).indices
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def best_config(fn_of_config, default: GemmConfig, sweep: bool) -> GemmConfig:
    """The shipped config, or with ``sweep`` the fastest of SWEEP (each timed once)."""
    if not sweep:
        return default
    return min(SWEEP, key=lambda c: bench_ms(lambda: fn_of_config(c), warmup=3, rep=20, graph=True))


def bench_shape(shape, tokens_list, sweep: bool) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    rows = []
    for t in tokens_list:
        cu = routing_offsets(t, e, k)
        m = t * k
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        a2 = torch.randn(m, i, device="cuda", dtype=torch.bfloat16)
        offs = cu[1:]

        def ours1(cfg):
            return grouped_gemm(x, w1, cu, activation="silu", config=cfg)

        def ours2(cfg):
            return grouped_gemm(a2, w2, cu, config=cfg)

        # correctness on these exact inputs, against torch's grouped GEMM in fp32-accumulated bf16
        t1 = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        ref1 = torch.nn.functional.silu(t1[:, :i].float()) * t1[:, i:].float()
        err1 = rel_err(ours1(None), ref1)
        err2 = rel_err(ours2(None), torch._grouped_mm(a2, w2.transpose(1, 2), offs=offs))

        cfg1 = best_config(ours1, pick_config(m, 2 * i, h, e, True, NUM_SMS), sweep)
        cfg2 = best_config(ours2, pick_config(m, h, i, e, False, NUM_SMS), sweep)
        ms = interleaved_ms({
            "ours1": lambda: ours1(cfg1), "ours2": lambda: ours2(cfg2),
            "torch1": lambda: torch._grouped_mm(x, w1.transpose(1, 2), offs=offs),
            "torch2": lambda: torch._grouped_mm(a2, w2.transpose(1, 2), offs=offs)},
            rounds=ROUNDS, warmup=3, rep=20, graph=True)
        ms1, ms2, tms1, tms2 = ms["ours1"], ms["ours2"], ms["torch1"], ms["torch2"]
        f1, f2 = 2 * m * 2 * i * h, 2 * m * h * i
        row = {
            "shape": shape.name, "T": t, "rows": m,
            "gemm1_ms": ms1, "gemm1_tflops": f1 / ms1 / 1e9, "gemm1_tile": f"{cfg1.tile_m}x{cfg1.tile_n}c{cfg1.cluster_m}",
            "gemm2_ms": ms2, "gemm2_tflops": f2 / ms2 / 1e9, "gemm2_tile": f"{cfg2.tile_m}x{cfg2.tile_n}c{cfg2.cluster_m}",
            "torch_gemm1_ms": tms1, "torch_gemm2_ms": tms2,
            "ours_total_ms": ms1 + ms2, "torch_total_ms": tms1 + tms2,
            "speedup_vs_torch": (tms1 + tms2) / (ms1 + ms2),
            "tflops_total": (f1 + f2) / (ms1 + ms2) / 1e9,
            "err_gemm1": err1, "err_gemm2": err2,
        }
        rows.append(row)
        print(f"{shape.name:14s} T={t:5d} ours {ms1:8.3f}+{ms2:8.3f} ms ({row['tflops_total']:6.1f} TF/s) "
              f"torch {tms1:8.3f}+{tms2:8.3f} ms  x{row['speedup_vs_torch']:.2f}  err {err1:.1e}/{err2:.1e} "
              f"tiles {row['gemm1_tile']}/{row['gemm2_tile']}", flush=True)
    del w1, w2
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,64,1024,8192")
    ap.add_argument("--shapes", default="", help="comma-separated name prefixes (default: all)")
    ap.add_argument("--sweep", action="store_true", help="time every tile config, keep the best")
    ap.add_argument("--name", default="sm90_grouped_gemm", help="result file name under perf/results/")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_grouped_gemm needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    global NUM_SMS
    NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
    dense = dense_mm_tflops()
    print(f"dense bf16 torch.mm 8192^3: {dense:.1f} TFLOP/s", flush=True)
    rows = []
    for shape in select_shapes(args.shapes):
        rows += bench_shape(shape, tokens, args.sweep)
    for r in rows:
        r["frac_of_dense_mm"] = r["tflops_total"] / dense
    write_results(
        args.name, rows,
        {"title": "sm90 grouped GEMM (bf16): GEMM1+SwiGLU and GEMM2 vs torch._grouped_mm",
         "dense_mm_tflops": dense, "sweep": args.sweep},
        md_columns=["shape", "T", "gemm1_ms", "gemm2_ms", "torch_gemm1_ms", "torch_gemm2_ms",
                    "speedup_vs_torch", "tflops_total", "frac_of_dense_mm", "gemm1_tile", "gemm2_tile",
                    "err_gemm1", "err_gemm2"],
        plot=speedup_plot("torch._grouped_mm time / ours (GEMM1+GEMM2)",
                          "cute-moe sm90 grouped GEMM vs torch._grouped_mm (bf16)", "tab:green"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
