"""Whole MoE layer latency on Hopper: cute-moe's fused_moe vs a torch._grouped_mm pipeline.

    python -m perf.sm90.bench_moe [--tokens 1,8,64,256,1024,8192]

For each reference shape and token count, with random softmax top-k routing: our experts pipeline
(plan, permute, GEMM1+SwiGLU, GEMM2, combine) eager and replayed from a CUDA graph, and a torch
pipeline doing the same work with torch ops (argsort permute, torch._grouped_mm, silu*up,
torch._grouped_mm, index_add combine) in a CUDA graph. The floor is max(FLOPs / dense bf16 mm rate,
touched weight bytes / read bandwidth), both measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import cute_moe
from perf.common import bench_ms, dense_mm_tflops, write_results, select_shapes, speedup_plot


def read_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Device read bandwidth (GB/s) of a sum over ``nbytes`` of random data."""
    src = torch.rand(nbytes // 4, device="cuda")
    ms = bench_ms(lambda: src.sum(), warmup=3, rep=10)
    del src
    return nbytes / (ms * 1e-3) / 1e9


def torch_pipeline(x, w1t, w2t, topk_w, topk_ids, num_experts, inter):
    """The same experts computation with torch ops only (no host sync: graph-capturable)."""
    t, k = topk_ids.shape
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    src = order // k
    h = torch._grouped_mm(x[src], w1t, offs=offs)
    a = F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(a, w2t, offs=offs)
    out = torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32)
    out.index_add_(0, src, y.float() * topk_w.flatten()[order, None])
    return out.to(x.dtype)


def bench_shape(shape, tokens_list, dense_tflops, read_gbs) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * i**-0.5
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    rows = []
    for t in tokens_list:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(t, e, device="cuda")
        topk_w, topk_ids = cute_moe.route(logits, k, renormalize=True)
        out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

        def ours():
            return cute_moe.fused_moe(x, w1, w2, topk_w, topk_ids, out=out, backend="cute")

        def theirs():
            return torch_pipeline(x, w1t, w2t, topk_w, topk_ids, e, i)

        ref = theirs().float()
        err = ((ours().float() - ref).norm() / ref.norm()).item()
        ms_eager = bench_ms(ours, warmup=5, rep=30)
        ms_graph = bench_ms(ours, warmup=5, rep=30, graph=True)
        ms_torch = bench_ms(theirs, warmup=5, rep=30, graph=True)
        active = int(torch.unique(topk_ids).numel())
        flops = 2 * t * k * (2 * i * h + h * i)
        weight_bytes = active * 3 * i * h * 2
        floor_ms = max(flops / (dense_tflops * 1e9), weight_bytes / (read_gbs * 1e6))
        row = {"shape": shape.name, "T": t, "ours_eager_ms": ms_eager, "ours_graph_ms": ms_graph,
               "torch_graph_ms": ms_torch, "speedup_vs_torch": ms_torch / ms_graph, "floor_ms": floor_ms,
               "ours_over_floor": ms_graph / floor_ms, "torch_over_floor": ms_torch / floor_ms,
               "active_experts": active, "err_vs_torch": err}
        rows.append(row)
        print(f"{shape.name:14s} T={t:5d} ours {ms_eager:8.3f} eager {ms_graph:8.3f} graph | torch {ms_torch:8.3f} "
              f"| x{row['speedup_vs_torch']:.2f} | floor {floor_ms:.3f} ({row['ours_over_floor']:.2f}x) err {err:.1e}",
              flush=True)
    del w1, w2, w1t, w2t
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192")
    ap.add_argument("--shapes", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_moe needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    dense = dense_mm_tflops()
    read = read_bandwidth_gbs()
    print(f"dense bf16 mm {dense:.1f} TFLOP/s, read bandwidth {read:.0f} GB/s", flush=True)
    rows = []
    for shape in select_shapes(args.shapes):
        rows += bench_shape(shape, tokens, dense, read)
    write_results(
        "sm90_moe_layer", rows,
        {"title": "Whole MoE layer (bf16 experts): cute-moe vs torch._grouped_mm pipeline",
         "dense_mm_tflops": dense, "read_gbs": read},
        md_columns=["shape", "T", "ours_eager_ms", "ours_graph_ms", "torch_graph_ms", "speedup_vs_torch",
                    "floor_ms", "ours_over_floor", "torch_over_floor", "err_vs_torch"],
        plot=speedup_plot("torch pipeline time / cute-moe (CUDA graphs)",
                          "Whole MoE layer (bf16): cute-moe vs torch._grouped_mm pipeline", "tab:blue"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
