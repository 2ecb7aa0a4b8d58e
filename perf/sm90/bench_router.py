"""Router logits of one decode token: our kernel (cute_moe.routing.router_logits) vs torch.mm.

    python -m perf.sm90.bench_router

For each reference shape, x [1, H] and router weight [E, H] (random bf16), both in CUDA graphs of 20
calls: microseconds per call of our one-warp-per-expert kernel (``kernels/router.cu``) and of
``torch.mm(x, w.T, out_dtype=float32)``, and their ratio. router_logits uses the kernel only where it
measured faster (H <= ROUTER_MAX_HIDDEN); this script times it on every shape.
"""

from __future__ import annotations

import sys

import torch

from cute_moe import _nvrtc, routing
from cute_moe.reference import router_logits_reference
from perf.common import bench_ms, select_shapes, write_results


def kernel_us(x: torch.Tensor, w: torch.Tensor) -> float:
    """The router kernel itself on any H (router_logits may pick torch.mm)."""
    out = torch.empty(1, w.shape[0], dtype=torch.float32, device=x.device)
    launch = lambda: routing.launch_router_kernel(x, w, out, _nvrtc.DTYPE_CODES[x.dtype])  # noqa: E731
    launch()
    torch.testing.assert_close(out, router_logits_reference(x, w), rtol=1e-5, atol=1e-4)
    return bench_ms(launch, graph=True, rep=30) * 1e3


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_router needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for shape in select_shapes(""):
        x = torch.randn(1, shape.hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(shape.num_experts, shape.hidden, device="cuda", dtype=torch.bfloat16) * shape.hidden**-0.5
        ours = kernel_us(x, w)
        mm = bench_ms(lambda: router_logits_reference(x, w), graph=True, rep=30) * 1e3
        rows.append({"shape": shape.name, "E": shape.num_experts, "H": shape.hidden, "kernel_us": ours,
                     "torch_mm_us": mm, "speedup": mm / ours, "used": shape.hidden <= routing.ROUTER_MAX_HIDDEN})
        print(f"{shape.name:14s} kernel {ours:5.2f} us  torch.mm {mm:5.2f} us  x{mm / ours:.2f}", flush=True)
    write_results("sm90_router", rows, {"title": "Router logits, one token: our kernel vs torch.mm (float32 out)"},
                  md_columns=["shape", "E", "H", "kernel_us", "torch_mm_us", "speedup", "used"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
