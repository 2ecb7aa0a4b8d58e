"""route + plan: route_gpu then make_plan (three kernels) against route_and_plan (one kernel).

``python perf/sweep_route_plan.py`` (CUDA GPU) times, CUDA-graph replayed, both ways on the four
reference shapes for T in TOKENS, the fused kernel forced (``fused=True``) at several minimum
tokens per CTA, and reports each time over the separate calls'. The auto choice of route_and_plan
(cute_moe.plan.FUSED_*) comes from this sweep. Writes perf/results/route_plan_sweep.{json,md,png}.
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cute_moe.plan import make_plan, route_and_plan
from cute_moe.routing import route_gpu
from perf.bench_routing import _inputs
from perf.common import bench_ms, select_shapes, write_results

TOKENS = (1, 64, 256, 1024, 4096, 8192, 16384)
TOKENS_PER_CTA = (2, 4, 8)
WARMUP, REP = 5, 30


def _us(fn) -> float:
    return bench_ms(fn, warmup=WARMUP, rep=REP, graph=True) * 1e3


def _plot(ax, rows):
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        ax.plot([r["tokens"] for r in sel], [r["separate_us"] for r in sel], linestyle="--", marker="o",
                label=f"{shape} separate")
        ax.plot([r["tokens"] for r in sel], [r["fused_4_us"] for r in sel], marker="s", label=f"{shape} fused")
    ax.axhline(10, color="gray", linewidth=0.8)
    ax.set(xscale="log", xlabel="tokens T", ylabel="us per call (CUDA graph)",
           title="route + plan: three kernels vs route_and_plan")
    ax.legend(fontsize=6, ncol=2)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf/sweep_route_plan.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for shape in select_shapes(args.shapes):
        E, k = shape.num_experts, shape.top_k
        for T in TOKENS:
            logits, routing, _ = _inputs(shape, T, device)
            row = {"shape": shape.name, "tokens": T,
                   "separate_us": _us(lambda: make_plan(route_gpu(logits, k, **routing)[1], E)),
                   "auto_us": _us(lambda: route_and_plan(logits, k, **routing))}
            for n in TOKENS_PER_CTA:
                row[f"fused_{n}_us"] = _us(lambda: route_and_plan(logits, k, **routing, fused=True, tokens_per_cta=n))
            row["fused_4_over_separate"] = row["fused_4_us"] / row["separate_us"]
            rows.append(row)
            print(row, flush=True)
    cols = ["shape", "tokens", "separate_us", "auto_us", *[f"fused_{n}_us" for n in TOKENS_PER_CTA],
            "fused_4_over_separate"]
    for path in write_results("route_plan_sweep", rows,
                              {"title": "route + plan: route_gpu + make_plan vs route_and_plan (one kernel)",
                               "tokens": TOKENS, "tokens_per_cta": TOKENS_PER_CTA, "warmup": WARMUP, "rep": REP},
                              md_columns=cols, plot=_plot):
        print(path)


if __name__ == "__main__":
    main()
