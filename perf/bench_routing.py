"""Routing bookkeeping stages on the GPU: route, plan, permute (bf16 and fp8 1x128), combine.

``python perf/bench_routing.py`` (or ``python -m perf.bench_routing``; needs a CUDA GPU) times every
stage for T in TOKENS on the four reference shapes (cute_moe.shapes.REFERENCE_SHAPES), eagerly and
replayed from a CUDA graph, plus route+plan together in one graph (the <= 10 us target for
T <= 4096): as two calls (route_gpu, make_plan: three kernels) and as route_and_plan (one kernel
where the tokens fit on the GPU at once; what the layer runs). Router logits are random normal with a per-expert offset (a realistic, skewed load);
x and y are random normal. GB/s counts the bytes each stage must move (read + written, each token
row of x read once) and is compared with the device-to-device copy bandwidth measured in the same
run. Writes perf/results/routing_stages.{json,md,png} and prints a summary table last.
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cute_moe.permute import FP8_GROUP, combine, permute, permute_fp8
from cute_moe.plan import make_plan, route_and_plan
from cute_moe.reference import ROUTING_PRESETS
from cute_moe.routing import route_gpu
from cute_moe.shapes import REFERENCE_SHAPES
from perf.common import bench_ms, copy_bandwidth_gbs, device_stamp, write_results

TOKENS = (1, 64, 1024, 4096, 8192, 65536)
PRESETS = {"Mixtral-8x7B": "mixtral", "DeepSeek-V3": "deepseek_v3", "Qwen3-30B-A3B": "qwen3_moe",
           "GPT-OSS-120B": "gpt_oss"}
BLOCK_M = 128
WARMUP, REP = 5, 30


def _stage_bytes(stage: str, T: int, E: int, k: int, H: int, logit_bytes: int = 2) -> int:
    """Bytes a stage must read + write (each x row read once, each permuted row written once)."""
    rows = T * k
    return {
        "route": T * E * logit_bytes + rows * 8,
        "plan": rows * 4 + rows * 8 + (2 * E + 1) * 4,
        "plan_padded": rows * 4 + rows * 16 + (3 * E + 2) * 4,
        "route+plan": T * E * logit_bytes + rows * 8 + rows * 8 + (2 * E + 1) * 4,
        "route_and_plan": T * E * logit_bytes + rows * 8 + rows * 8 + (2 * E + 1) * 4,
        "permute_bf16": T * H * 2 + rows * H * 2 + rows * 4,
        "permute_fp8_block": T * H * 2 + rows * H + rows * -(-H // FP8_GROUP) * 4 + rows * 4,
        "combine": rows * H * 2 + rows * 8 + T * H * 2,
    }[stage]


def _inputs(shape, T: int, device):
    E, H = shape.num_experts, shape.hidden
    logits = (torch.randn(T, E, device=device) + 0.5 * torch.randn(E, device=device)).bfloat16()
    routing = dict(ROUTING_PRESETS[PRESETS[shape.name]])
    if routing["scoring"] == "sigmoid" and routing.get("num_groups"):
        routing["correction_bias"] = torch.randn(E, device=device) * 0.1
    x = torch.randn(T, H, device=device).bfloat16()
    return logits, routing, x


def _measure(fn, graph: bool) -> float:
    return bench_ms(fn, warmup=WARMUP, rep=REP, graph=graph) * 1e3  # us


def bench_shape(shape, T: int, device, copy_gbs: float) -> list[dict]:
    E, k, H = shape.num_experts, shape.top_k, shape.hidden
    logits, routing, x = _inputs(shape, T, device)
    weights, ids = route_gpu(logits, k, **routing)
    plan = make_plan(ids, E)
    xp = torch.empty(T * k, H, dtype=torch.bfloat16, device=device)
    q = torch.empty(T * k, H, dtype=torch.float8_e4m3fn, device=device)
    qs = torch.empty(-(-H // FP8_GROUP), T * k, dtype=torch.float32, device=device)
    y = torch.randn(T * k, H, device=device).bfloat16()
    out = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    stages = {
        "route": lambda: route_gpu(logits, k, **routing),
        "plan": lambda: make_plan(ids, E),
        "plan_padded": lambda: make_plan(ids, E, block_m=BLOCK_M),
        "route+plan": lambda: make_plan(route_gpu(logits, k, **routing)[1], E),
        "route_and_plan": lambda: route_and_plan(logits, k, **routing),
        "permute_bf16": lambda: permute(x, plan, out=xp),
        "permute_fp8_block": lambda: permute_fp8(x, plan, scaling="block", out=q, out_scale=qs),
        "combine": lambda: combine(y, plan, weights, out=out),
    }
    rows = []
    for stage, fn in stages.items():
        eager = _measure(fn, graph=False)
        graph = _measure(fn, graph=True)
        gbs = _stage_bytes(stage, T, E, k, H) / (min(eager, graph) * 1e-6) / 1e9
        rows.append({"shape": shape.name, "tokens": T, "stage": stage, "eager_us": eager, "graph_us": graph,
                     "GB/s": gbs, "copy_frac": gbs / copy_gbs})
    return rows


def _plot(ax, rows):
    for stage in ("permute_bf16", "permute_fp8_block", "combine"):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            sel = [r for r in rows if r["stage"] == stage and r["shape"] == shape]
            ax.plot([r["tokens"] for r in sel], [r["copy_frac"] for r in sel], marker="o",
                    label=f"{stage} {shape}", linestyle={"permute_bf16": "-", "permute_fp8_block": ":",
                                                           "combine": "--"}[stage])
    ax.axhline(0.8, color="gray", linewidth=0.8)
    ax.set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth",
           title="permute / combine bandwidth (bytes read + written)")
    ax.legend(fontsize=6, ncol=2)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("perf/bench_routing.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it on the GPU machine")
    device = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for shape in REFERENCE_SHAPES:
        for T in TOKENS:
            rows += bench_shape(shape, T, device, copy_gbs)
            torch.cuda.empty_cache()
    meta = {"title": "Routing stages: route, plan, permute (bf16 / fp8 1x128), combine",
            "copy_bandwidth_gbs": copy_gbs, "tokens": TOKENS, "block_m": BLOCK_M,
            "dtype": "bfloat16", "warmup": WARMUP, "rep": REP,
            "bytes": "read + written; x rows read once, permuted rows written once"}
    for path in write_results("routing_stages", rows, meta, plot=_plot,
                              md_columns=["shape", "tokens", "stage", "eager_us", "graph_us", "GB/s", "copy_frac"]):
        print(path)
    _summary(rows, copy_gbs)


def _summary(rows: list[dict], copy_gbs: float) -> None:
    stamp = device_stamp()
    print(f"\n{stamp['card']}  copy bandwidth {copy_gbs:.0f} GB/s  commit {stamp['commit']}")
    print("graph-replay us per call (permute/combine: % of copy bandwidth)")
    cols = ("route", "plan", "route+plan", "route_and_plan", "permute_bf16", "permute_fp8_block", "combine")
    print(f"{'shape':<15}{'T':>7}" + "".join(f"{c:>19}" for c in cols))
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["tokens"]), {})[r["stage"]] = r
    for (shape, T), st in by_key.items():
        cells = []
        for c in cols:
            r = st[c]
            pct = f" ({100 * r['copy_frac']:.0f}%)" if c.startswith(("permute", "combine")) else ""
            cells.append(f"{r['graph_us']:.1f}{pct}".rjust(19))
        print(f"{shape:<15}{T:>7}" + "".join(cells))


if __name__ == "__main__":
    main()
