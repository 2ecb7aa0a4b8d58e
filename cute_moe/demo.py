"""``python -m cute_moe.demo``: one reduced Mixtral-shaped MoE layer through the public API.

Prints which backend ran, the device, the time per call and the relative Frobenius error against
the reference run on float32 copies of the same weights (so it measures bf16 rounding). Takes a
few seconds on a CPU, where it uses a smaller layer.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import MIXTRAL_8X7B, ROUTING_PRESETS, last_backend, moe
from .reference import moe_reference


def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds per call (CUDA events on GPU, perf_counter on CPU), after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shape = MIXTRAL_8X7B.scaled(hidden=1024 if on_gpu else 256, intermediate=3584 if on_gpu else 512)
    tokens = 256 if on_gpu else 64
    torch.manual_seed(0)
    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    x = torch.randn(tokens, h, device=device)
    router = torch.randn(e, h, device=device) * h ** -0.5
    w1 = torch.randn(e, 2 * i, h, device=device) * h ** -0.5
    w2 = torch.randn(e, h, i, device=device) * i ** -0.5
    routing = ROUTING_PRESETS["mixtral"]
    xb, w1b, w2b = (t.bfloat16() for t in (x, w1, w2))

    def run():
        return moe(xb, router, w1b, w2b, k, **routing)

    out = run()
    backend = last_backend()
    ms = _time_ms(run, device, reps=20 if on_gpu else 5)
    ref = moe_reference(xb.float(), router, w1b.float(), w2b.float(), k, **routing)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"{shape.name}: E={e} top_k={k} H={h} I={i}, T={tokens} tokens, bf16")
    print(f"device: {name}; backend: {backend}")
    print(f"time per call: {ms:.3f} ms; relative error vs float32 reference: {err:.2e}")


if __name__ == "__main__":
    main()
