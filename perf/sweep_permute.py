"""Sweep of the bf16 permute / combine launch settings (warps per CTA, unroll, CTAs per SM).

``python perf/sweep_permute.py`` (CUDA GPU) times permute and combine, CUDA-graph replayed, for the
T >= 8192 reference shapes (GPT-OSS H=2880 first: its 5760-byte rows are the slowest) under every
setting of cute_moe.permute's _WARPS, _UNROLL and _BLOCKS_PER_SM in the grids below, and prints the
fraction of device copy bandwidth of each, best first per shape. Picks nothing by itself: copy the
winner into cute_moe/permute.py.
"""

from __future__ import annotations

import itertools
import sys

import torch

if __package__ in (None, ""):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cute_moe import permute as pm
from cute_moe.plan import make_plan
from perf.bench_routing import _stage_bytes
from perf.common import bench_ms, copy_bandwidth_gbs, select_shapes

WARPS = (4, 8, 16)
UNROLL = (2, 3, 4, 6)
BLOCKS_PER_SM = (4, 8, 16, 32)
TOKENS = (8192, 65536)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="", help="comma-separated name prefixes (default: all, GPT-OSS first)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf/sweep_permute.py needs a CUDA GPU")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_gbs:.0f} GB/s")
    shapes = sorted(select_shapes(args.shapes), key=lambda s: s.name != "GPT-OSS-120B")
    for shape, T in itertools.product(shapes, [int(t) for t in args.tokens.split(",")]):
        E, k, H = shape.num_experts, shape.top_k, shape.hidden
        ids = torch.randint(0, E, (T, k), device="cuda", dtype=torch.int32)
        plan = make_plan(ids, E)
        x = torch.randn(T, H, device="cuda").bfloat16()
        xp = torch.empty(T * k, H, dtype=torch.bfloat16, device="cuda")
        y = torch.randn(T * k, H, device="cuda").bfloat16()
        w = torch.rand(T, k, device="cuda")
        out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        rows = []
        for warps, unroll, bps in itertools.product(WARPS, UNROLL, BLOCKS_PER_SM):
            pm._WARPS, pm._UNROLL, pm._BLOCKS_PER_SM = warps, unroll, bps
            pm._fn_cache.clear()
            for stage, fn in (("permute_bf16", lambda: pm.permute(x, plan, out=xp)),
                              ("combine", lambda: pm.combine(y, plan, w, out=out))):
                if stage == "combine" and unroll != UNROLL[0]:
                    continue  # combine has no unroll
                us = bench_ms(fn, warmup=3, rep=20, graph=True) * 1e3
                frac = _stage_bytes(stage, T, E, k, H) / (us * 1e-6) / 1e9 / copy_gbs
                rows.append((stage, frac, us, warps, unroll, bps))
        print(f"\n{shape.name} T={T} (E={E}, k={k}, H={H})")
        for stage in ("permute_bf16", "combine"):
            for r in sorted((r for r in rows if r[0] == stage), key=lambda r: -r[1])[:6]:
                print(f"  {r[0]:<13} {100 * r[1]:5.1f}%  {r[2]:8.1f} us  warps={r[3]} unroll={r[4]} blocks/SM={r[5]}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
