"""Decode, whole layer: ``moe`` (router, routing, experts) at small T, one kernel vs split vs staged vs torch.

    python -m perf.sm90.bench_decode_moe [--tokens 1,2] [--shapes ...]

For each reference shape (with its model's routing preset: DeepSeek-V3 sigmoid with 8 groups and a
correction bias, the others softmax) and small T, ``cute_moe.moe`` (bf16) in CUDA graphs, timed in
turn for 3 rounds (medians), each graph cycling through 8 random inputs so the routing, and with it
the touched experts, changes from call to call as in decode:

- ``routed``: the decode kernel routes itself (one launch for the whole layer);
- ``split``: router logits and routing kernels, then the decode kernel for the experts
  (``decode.ROUTE_IN_KERNEL = False``, the path before the fused routing);
- ``staged``: the staged pipeline (``decode.MAX_TOKENS = 0``: route + plan, permute, two grouped GEMMs,
  combine);
- ``torch``: torch.mm router logits, softmax top-k, then bench_moe's torch._grouped_mm pipeline.

The floor is max(FLOPs / dense mm rate, (touched expert bytes + router weight bytes) / read
bandwidth), both measured in this run. Errors: relative Frobenius vs the float32 reference layer
(``backend="reference"``).
"""

from __future__ import annotations

import itertools
import sys

import torch

import cute_moe
from cute_moe import decode
from cute_moe.reference import ROUTING_PRESETS
from perf.common import expert_weights, interleaved_ms, speedup_plot, write_results
from perf.sm90.bench_decode_layer import run_shapes
from perf.sm90.bench_moe import torch_pipeline

INPUTS = 8
PRESETS = {"Mixtral-8x7B": "mixtral", "DeepSeek-V3": "deepseek_v3", "Qwen3-30B-A3B": "qwen3_moe",
           "GPT-OSS-120B": "gpt_oss"}
VARIANTS = {"routed": (8, True), "split": (8, False), "staged": (0, True)}  # (MAX_TOKENS, ROUTE_IN_KERNEL)


def _set(variant: str) -> None:
    decode.MAX_TOKENS, decode.ROUTE_IN_KERNEL = VARIANTS[variant]


def bench_shape(shape, tokens_list, dense_tflops, read_gbs) -> list[dict]:
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    router = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    routing = dict(ROUTING_PRESETS[PRESETS.get(shape.name, "mixtral")])
    if routing.get("num_groups"):
        routing["correction_bias"] = torch.rand(e, device="cuda") * 0.1
    rows = []
    for t in tokens_list:
        xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16) for _ in range(INPUTS)]
        turn = itertools.count()
        out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

        def ours(variant):
            def call():
                _set(variant)
                return cute_moe.moe(xs[next(turn) % INPUTS], router, w1, w2, k, **routing, out=out, backend="cute")
            return call

        def theirs():
            x = xs[next(turn) % INPUTS]
            logits = torch.mm(x, router.T, out_dtype=torch.float32)
            tw, ti = torch.topk(logits.softmax(-1), k, dim=-1)
            return torch_pipeline(x, w1t, w2t, tw / tw.sum(-1, keepdim=True), ti, e, i)

        ref = cute_moe.moe(xs[0], router, w1, w2, k, **routing, backend="reference").float()
        errs = {}
        for variant in VARIANTS:
            _set(variant)
            out.fill_(float("nan"))
            got = cute_moe.moe(xs[0], router, w1, w2, k, **routing, out=out, backend="cute").float()
            errs[variant] = ((got - ref).norm() / ref.norm()).item()
        fns = {v: ours(v) for v in VARIANTS} | {"torch": theirs}
        ms = interleaved_ms(fns, rounds=3, graph=True, warmup=3, rep=20, calls_per_graph=8)
        _set("routed")
        active = sum(int(torch.unique(cute_moe.route(x.float() @ router.float().T, k, **routing,
                                                     backend="reference")[1]).numel()) for x in xs) / INPUTS
        flops = 2 * t * (k * 3 * i * h + e * h)
        floor_ms = max(flops / (dense_tflops * 1e9), (active * 3 * i * h + e * h) * 2 / (read_gbs * 1e6))
        row = {"shape": shape.name, "T": t, **{f"{v}_ms": ms[v] for v in fns}, "floor_ms": floor_ms,
               **{f"{v}_over_floor": ms[v] / floor_ms for v in VARIANTS},
               "speedup_vs_split": ms["split"] / ms["routed"], "speedup_vs_torch": ms["torch"] / ms["routed"],
               **{f"{v}_err": errs[v] for v in VARIANTS}, "active_experts": active}
        rows.append(row)
        print(f"{shape.name:14s} T={t}: " + " ".join(f"{v} {ms[v] * 1e3:.1f}us" for v in fns)
              + f" | floor {floor_ms * 1e3:.1f}us routed {row['routed_over_floor']:.2f}x split "
              f"{row['split_over_floor']:.2f}x | err {errs}", flush=True)
    del w1, w2, w1t, w2t
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    run = run_shapes(argv, __doc__, "1,2", bench_shape, ("MAX_TOKENS", "ROUTE_IN_KERNEL"))
    if run is None:
        return 2
    rows, dense, read = run
    write_results(
        "sm90_decode_moe", rows,
        {"title": "Decode, whole layer (moe): one kernel with routing vs split vs staged vs torch (bf16, CUDA graphs)",
         "dense_mm_tflops": dense, "read_gbs": read},
        md_columns=["shape", "T", "routed_ms", "split_ms", "staged_ms", "torch_ms", "floor_ms", "routed_over_floor",
                    "split_over_floor", "staged_over_floor", "speedup_vs_split", "speedup_vs_torch", "routed_err",
                    "split_err"],
        plot=speedup_plot("split time / one kernel", "Decode layer: routing inside the decode kernel (bf16)",
                          "tab:green", key="speedup_vs_split"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
