"""Decode grouped GEMMs (few tokens): how close GEMM1 and GEMM2 get to the weight-streaming floor.

    python -m perf.sm90.bench_decode_gemm [--tokens 1,8] [--shapes ...] [--sweep] [--ncu]

At small T the grouped GEMM reads each active expert's weights once and is memory-bound. Each timed
CUDA graph replays the GEMM on ``--routings`` different random routings in turn, so consecutive calls
touch different experts (as consecutive decode steps do) and the weights are not served from L2.
Reports microseconds per call, the active experts' weight bytes per second and its fraction of the
read bandwidth measured in the same run, for the shipped config (and with ``--sweep`` for every
64-row tile width), and for the shipped config the time of the same GEMM with one 64-deep k-tile
(same tiles, launch, prologue and epilogue: the fixed cost) with the streaming rate of the rest. ``--ncu``: run each
shipped GEMM twice and exit, for Nsight Compute.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from cute_moe.gemm import GemmConfig, grouped_gemm, pick_config
from cute_moe.gemm.config import TILE_N
from perf.common import bench_ms, expert_weights, select_shapes, write_results
from perf.sm90.bench_grouped_gemm import routing_offsets
from perf.sm90.bench_moe import read_bandwidth_gbs

SWEEP = [GemmConfig(64, n) for n in TILE_N]


def graph_us(fn, cus: list, config) -> float:
    """Microseconds per call of ``fn(cu, config)`` in a CUDA graph that runs it once on each routing of ``cus``."""
    turn = itertools.count()
    return 1e3 * bench_ms(lambda: fn(cus[next(turn) % len(cus)], config), warmup=len(cus), rep=20, graph=True,
                          calls_per_graph=len(cus))


def bench_shape(shape, tokens_list, routings: int, sweep: bool, read_gbs: float, ncu: bool) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    rows = []
    for t in tokens_list:
        m = t * k
        cus = [routing_offsets(t, e, k) for _ in range(routings)]
        active = sum(int((cu[1:] > cu[:-1]).sum()) for cu in cus) / routings
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        a2 = torch.randn(m, i, device="cuda", dtype=torch.bfloat16)
        # the same GEMMs with one 64-deep k-tile: same tiles, launch, prologue and epilogue, no stream
        x1, a1 = x[:, :64].contiguous(), a2[:, :64].contiguous()
        w1_1, w2_1 = w1[:, :, :64].contiguous(), w2[:, :, :64].contiguous()
        gemms = {
            "gemm1": (lambda cu, c: grouped_gemm(x, w1, cu, activation="silu", config=c),
                      lambda cu, c: grouped_gemm(x1, w1_1, cu, activation="silu", config=c),
                      pick_config(m, 2 * i, h, e, True), 2 * i * h * 2),
            "gemm2": (lambda cu, c: grouped_gemm(a2, w2, cu, config=c),
                      lambda cu, c: grouped_gemm(a1, w2_1, cu, config=c),
                      pick_config(m, h, i, e, False), h * i * 2),
        }
        for name, (fn, fn_fixed, shipped, expert_bytes) in gemms.items():
            if ncu:
                for _ in range(2):
                    fn(cus[0], shipped)
                continue
            configs = [shipped] + [c for c in SWEEP if sweep and c != shipped]
            for cfg in configs:
                us = graph_us(fn, cus, cfg)
                fixed_us = graph_us(fn_fixed, cus, cfg) if cfg == shipped else None
                gbs = active * expert_bytes / us / 1e3
                row = {"shape": shape.name, "T": t, "gemm": name, "active_experts": active,
                       "tile": f"{cfg.tile_m}x{cfg.tile_n}s{cfg.stages}", "shipped": cfg == shipped, "us": us,
                       "weight_gbs": gbs, "frac_of_read_bw": gbs / read_gbs, "one_ktile_us": fixed_us,
                       "stream_gbs": None if fixed_us is None else active * expert_bytes / max(us - fixed_us, 1e-3) / 1e3}
                rows.append(row)
                print(f"{shape.name:14s} T={t:3d} {name} {row['tile']:10s}{'*' if row['shipped'] else ' '} "
                      f"{us:8.2f} us {gbs:7.0f} GB/s ({100 * gbs / read_gbs:4.1f}% of read bw)"
                      + ("" if fixed_us is None else
                         f"; one k-tile {fixed_us:6.2f} us, rest {row['stream_gbs']:5.0f} GB/s"), flush=True)
    del w1, w2
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--shapes", default="", help="comma-separated name prefixes (default: all)")
    ap.add_argument("--routings", type=int, default=16, help="distinct routings cycled through per graph")
    ap.add_argument("--sweep", action="store_true", help="also time every 64-row tile config")
    ap.add_argument("--ncu", action="store_true", help="run each shipped GEMM twice and exit (for ncu)")
    ap.add_argument("--name", default="sm90_decode_gemm",
                    help="result file name under perf/results/ (the sweep: sm90_decode_gemm_sweep)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_decode_gemm needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    read_gbs = 0.0 if args.ncu else read_bandwidth_gbs()
    if not args.ncu:
        print(f"read bandwidth {read_gbs:.0f} GB/s", flush=True)
    rows = []
    for shape in select_shapes(args.shapes):
        rows += bench_shape(shape, [int(t) for t in args.tokens.split(",")], args.routings, args.sweep, read_gbs,
                            args.ncu)
    if args.ncu:
        torch.cuda.synchronize()
        return 0
    write_results(
        args.name, rows,
        {"title": "sm90 decode grouped GEMMs: weight-streaming rate vs read bandwidth", "read_gbs": read_gbs,
         "routings": args.routings},
        md_columns=["shape", "T", "gemm", "tile", "shipped", "active_experts", "us", "weight_gbs", "frac_of_read_bw",
                    "one_ktile_us", "stream_gbs"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
