"""One fp8 grouped GEMM per scaling mode, for Nsight Compute: where blockwise promotion loses time.

    ncu --kernel-name regex:kernel_cutlass --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats python -m perf.sm90.ncu_fp8_gemm --mode block

Runs GEMM1 (+SwiGLU) of a reference shape at ``--tokens`` twice (the first call compiles and warms
up; profile the second), on random operands quantized like the layer's. Compare ``--mode token``
(no promotion) with ``--mode block`` (and ``--overlap``): tensor pipe utilization, issue slots and
the stall reasons of the consumer warps. Prints the time of the second call too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from cute_moe.gemm import grouped_gemm
from cute_moe.gemm.config import pick_config
from perf.common import expert_weights, select_shapes
from perf.sm90.bench_grouped_gemm import routing_offsets
from perf.sm90.bench_grouped_gemm_fp8 import quantize_act, quantize_weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="Mixtral", help="reference shape name prefix")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--mode", default="block", choices=["tensor", "token", "block"])
    ap.add_argument("--overlap", choices=["on", "off"], default=None,
                    help="blockwise: force GemmConfig.overlap_promotion (default: the shipped choice)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_fp8_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = select_shapes(args.shape)[0]
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    w1, w2 = expert_weights(shape)
    (q1, s1), _ = quantize_weights(args.mode, w1, w2)
    del w1, w2
    m = args.tokens * k
    cu = routing_offsets(args.tokens, e, k)
    xq, sx = quantize_act(args.mode, torch.randn(m, h, device="cuda", dtype=torch.bfloat16))
    config = None
    if args.mode == "block" and args.overlap is not None:
        config = dataclasses.replace(pick_config(m, 2 * i, h, e, True, blockwise=True),
                                     overlap_promotion=args.overlap == "on")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):
        start.record()
        grouped_gemm(xq, q1, cu, activation="silu", a_scale=sx, b_scale=s1, config=config)
        end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    print(f"{shape.name} T={args.tokens} GEMM1 fp8 {args.mode}: {ms:.3f} ms, {2 * m * 2 * i * h / ms / 1e9:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
