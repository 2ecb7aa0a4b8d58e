"""Programmatic dependent launch on and off: the whole layer at decode sizes, same machine, same data.

    python -m perf.sm90.bench_pdl [--tokens 1,8] [--shapes ...]

Runs :func:`layer_us` in two child processes, one with ``CUTE_MOE_PDL=1`` and one with
``CUTE_MOE_PDL=0`` (the launch mode is fixed per process), and reports each shape's ``fused_moe``
time per call in a CUDA graph that cycles through 8 routings, and the ratio off / on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

import torch

ROUTINGS = 8


def layer_us(tokens: list[int], shapes: str) -> list[dict]:
    """``fused_moe`` microseconds per call (graph of 20 calls cycling through 8 routings) per shape and T."""
    import cute_moe
    from perf.common import bench_ms, expert_weights, select_shapes

    rows = []
    for shape in select_shapes(shapes):
        e, k, h = shape.num_experts, shape.top_k, shape.hidden
        w1, w2 = expert_weights(shape)
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            routings = [cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True)
                        for _ in range(ROUTINGS)]
            out = torch.empty_like(x)
            turn = itertools.count()

            def call():
                tw, ti = routings[next(turn) % ROUTINGS]
                return cute_moe.fused_moe(x, w1, w2, tw, ti, out=out, backend="cute")

            ms = bench_ms(call, warmup=3, rep=20, graph=True, calls_per_graph=20)
            rows.append({"shape": shape.name, "T": t, "us": ms * 1e3})
        del w1, w2
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--shapes", default="", help="comma-separated name prefixes (default: all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        print(json.dumps(layer_us(tokens, args.shapes)))
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_pdl needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    runs = {}
    for pdl in ("1", "0"):
        env = {**os.environ, "CUTE_MOE_PDL": pdl}
        cmd = [sys.executable, "-m", "perf.sm90.bench_pdl", "--child", "--tokens", args.tokens, "--shapes", args.shapes]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        runs[pdl] = json.loads(res.stdout.strip().splitlines()[-1])
    rows = []
    for on, off in zip(runs["1"], runs["0"]):
        rows.append({"shape": on["shape"], "T": on["T"], "pdl_us": on["us"], "no_pdl_us": off["us"],
                     "speedup": off["us"] / on["us"]})
        print(f"{on['shape']:14s} T={on['T']:3d} PDL {on['us']:8.1f} us, without {off['us']:8.1f} us "
              f"(x{off['us'] / on['us']:.3f})", flush=True)
    write_pdl_results(rows)
    return 0


def write_pdl_results(rows: list[dict]) -> None:
    from perf.common import speedup_plot, write_results

    write_results(
        "sm90_pdl", rows,
        {"title": "Whole layer with and without programmatic dependent launch (decode sizes)",
         "routings": ROUTINGS},
        md_columns=["shape", "T", "pdl_us", "no_pdl_us", "speedup"],
        plot=speedup_plot("time without PDL / with PDL", "cute-moe layer: programmatic dependent launch",
                          "tab:purple", key="speedup"),
    )


if __name__ == "__main__":
    sys.exit(main())
