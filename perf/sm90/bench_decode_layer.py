"""Decode: the one-kernel expert stage (cute_moe.decode) vs the staged pipeline vs torch, per T.

    python -m perf.sm90.bench_decode_layer [--tokens 1,2,4,8] [--shapes ...]

For each reference shape and small T, ``fused_moe`` (bf16) in CUDA graphs, timed in turn for 3
rounds (medians), each graph cycling through 8 random routings so the touched experts change from
call to call as in decode: the decode kernel (decode.pick_config's launch shape and a few fixed
ones), the staged pipeline (plan, permute, two grouped GEMMs, combine:
``decode.MAX_TOKENS = 0``) and the torch._grouped_mm pipeline of bench_moe. The floor is
max(FLOPs / dense mm rate, touched weight bytes / read bandwidth), both measured in this run.
Errors: relative Frobenius vs the float32 reference (cute_moe.reference.experts_reference).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import cute_moe
from cute_moe import decode
from cute_moe.reference import experts_reference
from perf.common import dense_mm_tflops, expert_weights, interleaved_ms, select_shapes, speedup_plot, write_results
from perf.sm90.bench_moe import read_bandwidth_gbs, torch_pipeline

ROUTINGS = 8
VARIANTS = {  # name -> (decode.MAX_TOKENS, decode.CONFIG); None: decode.pick_config per shape
    "decode": (8, None),
    "decode_w14": (8, decode.DecodeConfig(14)),
    "decode_w16": (8, decode.DecodeConfig(16)),
    "decode_w22": (8, decode.DecodeConfig(22)),
    "decode_w24": (8, decode.DecodeConfig(24)),
    "staged": (0, None),
}


def _set(variant: str) -> None:
    decode.MAX_TOKENS, decode.CONFIG = VARIANTS[variant]


def bench_shape(shape, tokens_list, dense_tflops, read_gbs) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    rows = []
    for t in tokens_list:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        routings = [cute_moe.route(torch.randn(t, e, device="cuda"), k, renormalize=True) for _ in range(ROUTINGS)]
        turn = itertools.count()
        out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

        def ours(variant):
            def call():
                _set(variant)
                tw, ti = routings[next(turn) % ROUTINGS]
                return cute_moe.fused_moe(x, w1, w2, tw, ti, out=out, backend="cute")
            return call

        def theirs():
            tw, ti = routings[next(turn) % ROUTINGS]
            return torch_pipeline(x, w1t, w2t, tw, ti, e, i)

        tw, ti = routings[0]
        ref = experts_reference(x, w1, w2, tw, ti, activation="silu").float()
        errs = {}
        for variant in VARIANTS:
            _set(variant)
            out.fill_(float("nan"))
            got = cute_moe.fused_moe(x, w1, w2, tw, ti, out=out, backend="cute").float()
            errs[variant] = ((got - ref).norm() / ref.norm()).item()
        fns = {v: ours(v) for v in VARIANTS} | {"torch": theirs}
        ms = interleaved_ms(fns, rounds=3, graph=True, warmup=3, rep=20, calls_per_graph=8)
        _set("decode")
        active = sum(int(torch.unique(ids).numel()) for _, ids in routings) / ROUTINGS
        flops = 2 * t * k * 3 * i * h
        floor_ms = max(flops / (dense_tflops * 1e9), active * 3 * i * h * 2 / (read_gbs * 1e6))
        row = {"shape": shape.name, "T": t, **{f"{v}_ms": ms[v] for v in fns}, "floor_ms": floor_ms,
               "decode_over_floor": ms["decode"] / floor_ms, "staged_over_floor": ms["staged"] / floor_ms,
               "speedup_vs_staged": ms["staged"] / ms["decode"], "speedup_vs_torch": ms["torch"] / ms["decode"],
               "decode_err": max(v for n, v in errs.items() if n != "staged"), "staged_err": errs["staged"],
               "active_experts": active}
        rows.append(row)
        print(f"{shape.name:14s} T={t}: " + " ".join(f"{v} {ms[v] * 1e3:.1f}us" for v in fns)
              + f" | floor {floor_ms * 1e3:.1f}us decode {row['decode_over_floor']:.2f}x staged "
              f"{row['staged_over_floor']:.2f}x | err {row['decode_err']:.1e} / {errs['staged']:.1e}", flush=True)
    del w1, w2, w1t, w2t
    torch.cuda.empty_cache()
    return rows


def run_shapes(argv, doc: str, default_tokens: str, bench_shape, knobs: tuple[str, ...]):
    """The decode benchmarks' driver: parse --tokens / --shapes, measure the dense mm rate and the
    read bandwidth, run ``bench_shape(shape, tokens, dense, read)`` per shape with decode's ``knobs``
    restored afterwards. Returns (rows, dense TFLOP/s, read GB/s), or None without a Hopper GPU."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--tokens", default=default_tokens)
    ap.add_argument("--shapes", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print(f"{doc.splitlines()[0]}: needs a Hopper (sm_90) GPU", file=sys.stderr)
        return None
    saved = [getattr(decode, k) for k in knobs]
    dense, read = dense_mm_tflops(), read_bandwidth_gbs()
    print(f"dense bf16 mm {dense:.1f} TFLOP/s, read bandwidth {read:.0f} GB/s", flush=True)
    rows = []
    try:
        for shape in select_shapes(args.shapes):
            rows += bench_shape(shape, [int(t) for t in args.tokens.split(",")], dense, read)
    finally:
        for k, v in zip(knobs, saved):
            setattr(decode, k, v)
    return rows, dense, read


def main(argv=None) -> int:
    run = run_shapes(argv, __doc__, "1,2,4,8", bench_shape, ("MAX_TOKENS", "CONFIG"))
    if run is None:
        return 2
    rows, dense, read = run
    write_results(
        "sm90_decode_layer", rows,
        {"title": "Decode: one-kernel experts (cute_moe.decode) vs staged pipeline vs torch (bf16, CUDA graphs)",
         "dense_mm_tflops": dense, "read_gbs": read},
        md_columns=["shape", "T", "decode_ms", *[f"{v}_ms" for v in VARIANTS if v not in ("decode", "staged")],
                    "staged_ms", "torch_ms",
                    "floor_ms", "decode_over_floor", "staged_over_floor", "speedup_vs_staged", "speedup_vs_torch",
                    "decode_err", "staged_err"],
        plot=speedup_plot("staged pipeline time / decode kernel", "Decode experts: one kernel vs staged (bf16)",
                          "tab:purple", key="speedup_vs_staged"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
