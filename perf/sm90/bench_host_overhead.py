"""Host (CPU) overhead per eager call of the MoE layer and of each public op, at small T.

    python -m perf.sm90.bench_host_overhead [--tokens 1] [--calls 300] [--profile PATH]

For each reference shape: the CPU time of enqueuing one call (median over bursts of 10 calls, each
burst timed from an empty launch queue; see :func:`host_us`), for ``cute_moe.moe`` (at T <= decode.MAX_TOKENS
one kernel: router, routing and experts; ``moe_us`` with ``out=``, ``moe_alloc_us`` allocating its
output), ``nn.MoE`` eager, the decode kernel's cooperative launch alone (``decode_launch_us``: the
driver call with packed arguments, our floor), ``fused_moe`` on given routing, ``route``, ``make_plan``, ``permute``,
``grouped_gemm`` and ``combine``, and ``nn.MoE`` with :meth:`cute_moe.nn.MoE.cuda_graphs` (input copy,
graph replay, output copy; ``nocopy``: ``copy_output=False``, no output copy; ``graph_replay`` in the JSON
rows says whether replays went through the driver or ``graph.replay()``; ``graph_launch_us`` and
``memcpy_us``: the driver calls a graphed call makes, alone). A torch reference point in the same run:
the CPU time of one ``torch._grouped_mm`` call. ``*_cpu_us``: the same calls timed by this thread's CPU
time instead of the wall clock, ours and torch's for every shape timed in turn for 5 rounds (medians;
``*_rounds`` in the JSON: each round's value);
``moe_ws_cpu_us``: moe with ``out=`` and a ``cute_moe.Workspace`` (no allocation per call);
``bound_ws_cpu_us``: the same call through ``cute_moe.bind_moe`` (weights and options bound once);
``moe_over_torch_op``: eager moe's CPU time over one torch._grouped_mm call's; ``*_single_cpu_us``: one call
at a time onto an idle GPU (a synchronize before each, not timed), CPU time. ``--profile`` writes a cProfile breakdown (by
own time) of the moe calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from types import SimpleNamespace

import torch

import cute_moe
from cute_moe import _nvrtc, decode
from cute_moe.gemm import grouped_gemm
from cute_moe.permute import combine, permute
from cute_moe.plan import make_plan
from perf.common import expert_weights, select_shapes, write_results


def host_us(fn, calls: int, burst: int = 10, cpu: bool = False) -> float:
    """Median microseconds per enqueued call of ``fn`` over bursts of ``burst`` calls, each burst
    timed from an empty launch queue (after a synchronize): wall time, or with ``cpu`` this thread's
    CPU time (time.thread_time: time the host spends descheduled on a shared machine, which moves
    wall times by 2x from run to run, does not count). Bursts, not one long loop: a long loop of
    graph replays fills the launch queue and then times the GPU; single calls after a synchronize add
    the host's wake-up from the wait to every sample."""
    clock = time.thread_time if cpu else time.perf_counter
    for _ in range(20):
        fn()
    samples = []
    for _ in range(max(1, calls // burst)):
        torch.cuda.synchronize()
        t0 = clock()
        for _ in range(burst):
            fn()
        samples.append((clock() - t0) / burst * 1e6)
    torch.cuda.synchronize()
    return sorted(samples)[len(samples) // 2]


def interleaved_cpu_us(fns: list[dict], calls: int, rounds: int = 5) -> list[dict]:
    """Median over ``rounds`` of :func:`host_us` (CPU time) for each function of each dict in
    ``fns`` (one dict per shape), every round timing all of them in turn, so a shared host's slow
    phases (which double every host time for tens of seconds) fall on every shape and on the torch
    reference alike instead of on whichever shape was being timed. Also returns each value's spread
    over the rounds (``<name>_rounds``)."""
    times = [{name: [] for name in group} for group in fns]
    for _ in range(rounds):
        for group, acc in zip(fns, times):
            for name, fn in group.items():
                acc[name].append(host_us(fn, calls, cpu=True))
    out = []
    for acc in times:
        row = {name: sorted(ts)[len(ts) // 2] for name, ts in acc.items()}
        row |= {f"{name}_rounds": [round(t, 2) for t in ts] for name, ts in acc.items()}
        out.append(row)
    return out


def layer_inputs(shape, tokens: int) -> SimpleNamespace:
    """One shape's weights, inputs, routing and plan, and its moe / torch._grouped_mm calls."""
    e, k, h = shape.num_experts, shape.top_k, shape.hidden
    w1, w2 = expert_weights(shape)
    rw = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    logits = torch.randn(tokens, e, device="cuda")
    topk_w, topk_ids = cute_moe.route(logits, k, renormalize=True)
    plan = make_plan(topk_ids, e)
    xp = permute(x, plan)
    offs, w1t = plan.cu_seqlens[1:], w1.transpose(1, 2)
    return SimpleNamespace(
        e=e, k=k, h=h, w1=w1, w2=w2, rw=rw, x=x, out=out, logits=logits, topk_w=topk_w, topk_ids=topk_ids, plan=plan,
        xp=xp, moe=lambda: cute_moe.moe(x, rw, w1, w2, k, renormalize=True, out=out, backend="cute"),
        torch_op=lambda: torch._grouped_mm(xp, w1t, offs=offs))


def cpu_fns(li: SimpleNamespace) -> dict:
    """The calls whose CPU time is timed in rounds across shapes (see :func:`interleaved_cpu_us`):
    moe with out=, with out= and a Workspace, the bound call, nn.MoE eager, one torch._grouped_mm call."""
    x, out, rw, w1, w2, k = li.x, li.out, li.rw, li.w1, li.w2, li.k
    ws = cute_moe.Workspace()
    bound = cute_moe.bind_moe(rw, w1, w2, k, renormalize=True, workspace=cute_moe.Workspace(), backend="cute")
    eager = cute_moe.nn.MoE.from_weights(rw, w1, w2, k, renormalize=True, backend="cute")
    return {"moe_cpu_us": li.moe,
            "moe_ws_cpu_us": lambda: cute_moe.moe(x, rw, w1, w2, k, renormalize=True, out=out, workspace=ws,
                                                  backend="cute"),
            "bound_ws_cpu_us": lambda: bound(x, out=out),
            "nn_moe_eager_cpu_us": lambda: eager(x),
            "torch_grouped_mm_cpu_us": li.torch_op}


def bench_shape(shape, li: SimpleNamespace, tokens: int, calls: int, profile: list, cpu: dict) -> dict:
    e, k, h, w1, w2, rw, x, out = li.e, li.k, li.h, li.w1, li.w2, li.rw, li.x, li.out
    logits, topk_w, topk_ids, plan, xp = li.logits, li.topk_w, li.topk_ids, li.plan, li.xp
    moe, torch_op = li.moe, li.torch_op
    hid = grouped_gemm(xp, w1, plan.cu_seqlens, activation="silu")
    y = grouped_gemm(hid, w2, plan.cu_seqlens)
    graphed = cute_moe.nn.MoE.from_weights(rw, w1, w2, k, renormalize=True, backend="cute").cuda_graphs(64)
    assert torch.equal(graphed(x), graphed._eager(x, None))
    nocopy = cute_moe.nn.MoE.from_weights(rw, w1, w2, k, renormalize=True, backend="cute").cuda_graphs(
        64, copy_output=False)
    assert torch.equal(nocopy(x), graphed._eager(x, None))
    eager = cute_moe.nn.MoE.from_weights(rw, w1, w2, k, renormalize=True, backend="cute")
    route = decode.route_key(rw, k, "softmax", True, None, None, None)
    lc = decode.moe_launch(x, w1, route, top_k=k, activation="silu")
    scratch = torch.empty(lc.scratch, device="cuda", dtype=torch.uint8).data_ptr()
    launch_args = (x.data_ptr(), w1.data_ptr(), w2.data_ptr(), 0, 0, 0, 0, 0, out.data_ptr(), scratch, rw.data_ptr(),
                   0, 1.0, scratch + lc.parts_at, *lc.sizes)
    row = {
        "shape": shape.name, "T": tokens,
        "moe_us": host_us(moe, calls),
        **cpu,
        "moe_single_cpu_us": host_us(moe, calls // 3, burst=1, cpu=True),
        "torch_grouped_mm_single_cpu_us": host_us(torch_op, calls // 3, burst=1, cpu=True),
        "moe_alloc_us": host_us(lambda: cute_moe.moe(x, rw, w1, w2, k, renormalize=True, backend="cute"), calls),
        "nn_moe_eager_us": host_us(lambda: eager(x), calls),
        "decode_launch_us": host_us(lambda: lc.launch(*launch_args), calls),
        "nn_moe_cuda_graphs_us": host_us(lambda: graphed(x), calls),
        "nn_moe_cuda_graphs_nocopy_us": host_us(lambda: nocopy(x), calls),
        "graph_replay": "driver" if all(g.exec_handle for g in graphed._graphs.values()) else "torch",
        "fused_moe_us": host_us(lambda: cute_moe.fused_moe(x, w1, w2, topk_w, topk_ids, out=out, backend="cute"),
                                calls),
        "route_us": host_us(lambda: cute_moe.route(logits, k, renormalize=True, backend="cute"), calls),
        "plan_us": host_us(lambda: make_plan(topk_ids, e), calls),
        "permute_us": host_us(lambda: permute(x, plan), calls),
        "gemm1_us": host_us(lambda: grouped_gemm(xp, w1, plan.cu_seqlens, activation="silu"), calls),
        "gemm2_us": host_us(lambda: grouped_gemm(hid, w2, plan.cu_seqlens), calls),
        "combine_us": host_us(lambda: combine(y, plan, topk_w), calls),
        "torch_grouped_mm_us": host_us(torch_op, calls),
        "torch_empty_us": host_us(lambda: torch.empty(tokens, h, device="cuda", dtype=torch.bfloat16), calls),
    }
    row["moe_over_torch_op"] = row["moe_cpu_us"] / row["torch_grouped_mm_cpu_us"]
    g = next(iter(nocopy._graphs.values()))
    if g.exec_handle:
        stream = torch.cuda.current_stream().cuda_stream
        row["graph_launch_us"] = host_us(lambda: _nvrtc.graph_launch(g.exec_handle, stream), calls)
        row["memcpy_us"] = host_us(lambda: _nvrtc.memcpy_dtod(g.x_ptr, x.data_ptr(), g.x_bytes, stream), calls)
    assert cute_moe.last_backend() == "cute"
    if profile is not None:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            moe()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        profile.append(f"### {shape.name} T={tokens}: {calls} moe calls\n{s.getvalue()}")
    print(" ".join(f"{key}={v:.1f}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--shapes", default="")
    ap.add_argument("--profile", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_host_overhead needs a Hopper (sm_90) GPU", file=sys.stderr)
        return 2
    profile = [] if args.profile else None
    shapes = select_shapes(args.shapes)
    inputs = [layer_inputs(s, args.tokens) for s in shapes]
    cpu = interleaved_cpu_us([cpu_fns(li) for li in inputs], args.calls)
    rows = [bench_shape(s, li, args.tokens, args.calls, profile, c) for s, li, c in zip(shapes, inputs, cpu)]
    if profile is not None:
        with open(args.profile, "w") as f:
            f.write("\n".join(profile))
    write_results(
        "sm90_host_overhead", rows,
        {"title": f"CPU time per eager call (microseconds, T={args.tokens}): whole layer and each op",
         "target": "moe host overhead <= 20 us per call"},
        md_columns=["shape", "T", "moe_us", "moe_cpu_us", "moe_ws_cpu_us", "bound_ws_cpu_us", "torch_grouped_mm_cpu_us", "moe_over_torch_op",
                    "moe_single_cpu_us", "torch_grouped_mm_single_cpu_us", "moe_alloc_us", "nn_moe_eager_us",
                    "nn_moe_eager_cpu_us", "decode_launch_us", "nn_moe_cuda_graphs_us", "nn_moe_cuda_graphs_nocopy_us", "fused_moe_us",
                    "route_us", "plan_us", "permute_us", "gemm1_us", "gemm2_us", "combine_us", "torch_grouped_mm_us",
                    "torch_empty_us", "graph_launch_us", "memcpy_us"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
