"""GPU run of the public API on the reference backend: torch in -> torch out and cupy in -> cupy out.

``python -m perf.bench_reference`` (needs a CUDA GPU and cupy) times ``cute_moe.moe`` with
backend="reference" on a reduced Mixtral layer for a few token counts, checks the result against
the float32 reference and that cupy and torch inputs give identical outputs, and records everything
in perf/results/reference_api.{json,md,png}.
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cute_moe import MIXTRAL_8X7B, ROUTING_PRESETS, last_backend, moe
from cute_moe.interop import as_torch
from cute_moe.reference import moe_reference
from perf.common import bench_ms, write_results

TOKENS = (1, 16, 128, 1024)


def _layer(device: torch.device):
    """A reduced Mixtral layer in bf16 (router weight in float32), weights with std 1/sqrt(fan_in)."""
    shape = MIXTRAL_8X7B.scaled(hidden=1024, intermediate=3584)
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    g = torch.Generator(device=device).manual_seed(0)
    router = torch.randn(e, h, device=device, generator=g) * h ** -0.5
    w1 = (torch.randn(e, 2 * i, h, device=device, generator=g) * h ** -0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device=device, generator=g) * i ** -0.5).bfloat16()
    return shape, router, w1, w2


def _plot(ax, rows):
    for io in ("torch", "cupy"):
        sel = [r for r in rows if r["io"] == io]
        ax.plot([r["tokens"] for r in sel], [r["ms"] for r in sel], marker="o", label=f"{io} in/out")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per call",
           title="cute_moe.moe, backend='reference' (reduced Mixtral, bf16)")
    ax.legend()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("perf/bench_reference.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it on the GPU machine")
    import cupy

    device = torch.device("cuda")
    shape, router, w1, w2 = _layer(device)
    routing = ROUTING_PRESETS["mixtral"]
    tensors = {"torch": (router, w1, w2), "cupy": tuple(cupy.from_dlpack(t) for t in (router, w1, w2))}
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, shape.hidden, device=device).bfloat16()
        ref = moe_reference(x.float(), router, w1.float(), w2.float(), shape.top_k, **routing)
        outputs = {}
        for io, (r, a, b) in tensors.items():
            xi = x if io == "torch" else cupy.from_dlpack(x)

            def call():
                return moe(xi, r, a, b, shape.top_k, **routing, backend="reference")

            out = call()
            assert type(out).__module__.split(".")[0] == io, f"{io} in gave {type(out)} out"
            assert last_backend() == "reference"
            outputs[io] = as_torch(out, "out")
            err = ((outputs[io].float() - ref).norm() / ref.norm()).item()
            rows.append({"tokens": tokens, "io": io, "ms": bench_ms(call, warmup=3, rep=20),
                         "rel_err_vs_fp32": err, "out_type": f"{type(out).__module__}.{type(out).__name__}"})
        rows[-1]["cupy_equals_torch"] = rows[-2]["cupy_equals_torch"] = bool(
            torch.equal(outputs["torch"], outputs["cupy"]))
    meta = {"title": "Public API on the reference backend (torch and cupy I/O)",
            "shape": vars(shape), "dtype": "bfloat16", "routing": routing, "backend": "reference"}
    for path in write_results("reference_api", rows, meta, plot=_plot,
                              md_columns=["tokens", "io", "ms", "rel_err_vs_fp32", "cupy_equals_torch", "out_type"]):
        print(path)


if __name__ == "__main__":
    main()
