"""Whole MoE layer latency on Hopper: cute-moe's fused_moe vs torch baselines, bf16 and fp8.

    python -m perf.sm90.bench_moe [--tokens 1,8,64,256,1024,8192,32768] [--shapes ...] [--no-fp8]

For each reference shape and token count, with random softmax top-k routing: our experts pipeline
(plan, permute, GEMM1+SwiGLU, GEMM2, combine: ``fused_moe``; at T <= cute_moe.decode.MAX_TOKENS the
one-kernel decode path) eager and replayed from a CUDA graph;
the whole layer with its router too (``moe``: router logits, top-k, then the experts) in a CUDA graph,
cycling through 8 inputs at T <= 256 (``moe_graph_ms``, ``moe_over_floor``); in the same run
a torch pipeline doing the same work with torch ops (argsort permute, torch._grouped_mm, silu*up,
torch._grouped_mm, index_add combine; ours and it timed in turn for ROUNDS rounds, medians) and a per-expert torch loop (one mm pair per active expert,
the routing fixed on the host before timing), both in CUDA graphs; and our fp8 layer (blockwise
1x128 / 128x128 scales, as DeepSeek-V3 ships) in a CUDA graph. The bf16
floor is max(FLOPs / dense bf16 mm rate, touched weight bytes / read bandwidth); the fp8 floor uses
the dense fp8 mm rate (torch._scaled_mm) and 1-byte weights; all rates are measured in the same run.
At T <= 256 consecutive calls (ours and the torch pipeline) cycle through 8 routings, so the touched
experts change from call to call as in decode and small layers' weights are not re-read from L2
(the per-expert loop keeps one routing).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

import cute_moe
from perf.common import (bench_ms, dense_mm_tflops, expert_weights, interleaved_ms, quantize_experts, select_shapes,
                         speedup_plot, write_results)


ROUTINGS = 8  # distinct routings cycled through per timed graph at T <= 256
ROUNDS = 3  # ours vs the torch pipeline: rounds timed in turn, medians reported


def read_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Device read bandwidth (GB/s) of a sum over ``nbytes`` of random data."""
    src = torch.rand(nbytes // 4, device="cuda")
    ms = bench_ms(lambda: src.sum(), warmup=3, rep=10)
    del src
    return nbytes / (ms * 1e-3) / 1e9


def dense_fp8_tflops(n: int = 8192) -> float:
    """Dense fp8 e4m3 n^3 torch._scaled_mm throughput in TFLOP/s (per-tensor scales, bf16 out)."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).T
    one = torch.ones((), device="cuda")
    ms = bench_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), warmup=5, rep=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def torch_expert_loop(topk_ids, num_experts):
    """The per-expert torch loop (the naive MoE): routing resolved on the host once, then per call a
    gather, one mm pair per active expert and an index_add combine (graph-capturable)."""
    t, k = topk_ids.shape
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    src = order // k
    bounds = torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()
    segments = [(e, a, b) for e, (a, b) in enumerate(zip([0] + bounds[:-1], bounds)) if b > a]

    def run(x, w1, w2, topk_w, inter):
        xs = x[src]
        y = torch.empty(t * k, x.shape[1], device=x.device, dtype=x.dtype)
        for e, a, b in segments:
            h = xs[a:b] @ w1[e].T
            y[a:b] = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].T
        out = torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32)
        out.index_add_(0, src, y.float() * topk_w.flatten()[order, None])
        return out.to(x.dtype)

    return run


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


def bench_shape(shape, tokens_list, dense_tflops, read_gbs, fp8_tflops) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    fp8_mode = "blockwise"
    qw = quantize_experts(w1, w2, fp8_mode) if fp8_tflops else None
    rows = []
    for t in tokens_list:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        # consecutive calls take different routings (as decode steps do), so at small T the touched
        # experts change from call to call and their weights are not served from L2
        routings = [cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
                    for _ in range(ROUTINGS if t <= 256 else 1)]
        turn = itertools.count()
        topk_w, topk_ids = routings[0]
        out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

        def ours():
            tw, ti = routings[next(turn) % len(routings)]
            return cute_moe.fused_moe(x, w1, w2, tw, ti, out=out, backend="cute")

        def theirs():
            tw, ti = routings[next(turn) % len(routings)]
            return torch_pipeline(x, w1t, w2t, tw, ti, e, i)

        ref = torch_pipeline(x, w1t, w2t, topk_w, topk_ids, e, i).float()
        got = cute_moe.fused_moe(x, w1, w2, topk_w, topk_ids, out=out, backend="cute").float()
        err = ((got - ref).norm() / ref.norm()).item()
        big = t * k * h * i >= 2**36  # milliseconds per call: fewer repetitions
        reps = dict(warmup=2, rep=5, calls_per_graph=2) if big else dict(warmup=5, rep=30)
        ms_eager = bench_ms(ours, warmup=reps["warmup"], rep=reps["rep"])
        # ours and the torch pipeline in turn for ROUNDS rounds (medians): clock drift over the run
        # falls on both alike
        ms = interleaved_ms({"ours": ours, "torch": theirs}, rounds=ROUNDS, graph=True, **reps)
        ms_graph, ms_torch = ms["ours"], ms["torch"]
        rw = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
        xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16) for _ in range(len(routings))]
        ms_moe = bench_ms(lambda: cute_moe.moe(xs[next(turn) % len(xs)], rw, w1, w2, k, renormalize=True, out=out,
                                               backend="cute"), graph=True, **reps)
        loop = torch_expert_loop(topk_ids, e)
        ms_loop = bench_ms(lambda: loop(x, w1, w2, topk_w, i), warmup=2, rep=10, graph=True, calls_per_graph=2)
        active = sum(int(torch.unique(ti).numel()) for _, ti in routings) / len(routings)
        flops = 2 * t * k * (2 * i * h + h * i)
        weight_bytes = active * 3 * i * h * 2
        floor_ms = max(flops / (dense_tflops * 1e9), weight_bytes / (read_gbs * 1e6))
        row = {"shape": shape.name, "T": t, "ours_eager_ms": ms_eager, "ours_graph_ms": ms_graph,
               "torch_graph_ms": ms_torch, "torch_loop_graph_ms": ms_loop, "speedup_vs_torch": ms_torch / ms_graph,
               "speedup_vs_loop": ms_loop / ms_graph, "floor_ms": floor_ms,
               "ours_over_floor": ms_graph / floor_ms, "torch_over_floor": ms_torch / floor_ms,
               "moe_graph_ms": ms_moe, "moe_over_floor": ms_moe / floor_ms,
               "active_experts": active, "err_vs_torch": err}
        if qw is not None:
            def ours_fp8():
                tw, ti = routings[next(turn) % len(routings)]
                return cute_moe.fused_moe(x, None, None, tw, ti, quant=qw, out=out, backend="cute")

            got = cute_moe.fused_moe(x, None, None, topk_w, topk_ids, quant=qw, out=out, backend="cute").float()
            fp8_err = ((got - ref).norm() / ref.norm()).item()
            ms_fp8 = bench_ms(ours_fp8, graph=True, **reps)
            fp8_floor = max(flops / (fp8_tflops * 1e9), weight_bytes / 2 / (read_gbs * 1e6))
            row.update(fp8_mode=fp8_mode, fp8_graph_ms=ms_fp8, fp8_speedup_vs_bf16=ms_graph / ms_fp8,
                       fp8_floor_ms=fp8_floor, fp8_over_floor=ms_fp8 / fp8_floor, fp8_err_vs_torch_bf16=fp8_err)
        rows.append(row)
        print(f"{shape.name:14s} T={t:5d} ours {ms_eager:8.3f} eager {ms_graph:8.3f} graph | torch {ms_torch:8.3f} "
              f"| x{row['speedup_vs_torch']:.2f} | loop {ms_loop:8.3f} | floor {floor_ms:.3f} "
              f"({row['ours_over_floor']:.2f}x) err {err:.1e} | moe {ms_moe:8.3f} ({row['moe_over_floor']:.2f}x)"
              + (f" | fp8 {fp8_mode} {row['fp8_graph_ms']:8.3f} (x{row['fp8_speedup_vs_bf16']:.2f} vs bf16, "
                 f"{row['fp8_over_floor']:.2f}x floor)" if qw is not None else ""), flush=True)
    del w1, w2, w1t, w2t, qw
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192,32768")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 layer")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_moe needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    dense = dense_mm_tflops()
    read = read_bandwidth_gbs()
    fp8 = 0.0 if args.no_fp8 else dense_fp8_tflops()
    print(f"dense bf16 mm {dense:.1f} TFLOP/s, fp8 {fp8:.1f} TFLOP/s, read bandwidth {read:.0f} GB/s", flush=True)
    rows = []
    for shape in select_shapes(args.shapes):
        rows += bench_shape(shape, tokens, dense, read, fp8)
    write_results(
        "sm90_moe_layer", rows,
        {"title": "Whole MoE layer: cute-moe (bf16, fp8) vs torch._grouped_mm pipeline and per-expert loop",
         "dense_mm_tflops": dense, "dense_fp8_tflops": fp8, "read_gbs": read},
        md_columns=["shape", "T", "ours_eager_ms", "ours_graph_ms", "torch_graph_ms", "torch_loop_graph_ms",
                    "speedup_vs_torch", "speedup_vs_loop", "floor_ms", "ours_over_floor", "err_vs_torch",
                    "moe_graph_ms", "moe_over_floor", "fp8_mode", "fp8_graph_ms", "fp8_speedup_vs_bf16", "fp8_over_floor", "fp8_err_vs_torch_bf16"],
        plot=speedup_plot("torch pipeline time / cute-moe (CUDA graphs)",
                          "Whole MoE layer (bf16): cute-moe vs torch._grouped_mm pipeline", "tab:blue"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
