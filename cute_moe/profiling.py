"""Per-stage GPU times of one MoE layer call on the cute backend: ``cute_moe.profile(...)``.

Stages: route (router logits matmul + routing kernel), plan, permute, gemm1 (GEMM1 + activation),
gemm2, combine. Each stage is bracketed by CUDA events; before every timed call the stream is
held with ``torch.cuda._sleep`` so the host enqueues the whole call before the GPU starts it, and the
event gaps are GPU execution times, not host launch latency. Times are medians over ``reps`` calls.
``call`` is the whole call timed the same way without the intermediate events. Calls of up to
``cute_moe.decode.MAX_TOKENS`` tokens normally run the experts as one kernel (:mod:`cute_moe.decode`),
which has no stages: profile times the staged pipeline for them (its ``call`` included).
"""

from __future__ import annotations

import statistics

import torch

STAGES = ("route", "plan", "permute", "gemm1", "gemm2", "combine")
# ~10 ms at H100/H200 clocks: longer than the host needs to enqueue a call with its stage events (on a
# host that took ~0.5 ms per eager call, 1 ms was too short at T=2048: the stages timed the host)
_SLEEP_CYCLES = 20_000_000


def _gpu_only(x) -> None:
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
        raise RuntimeError(f"cute_moe.profile times the cute GPU kernels with CUDA events and needs CUDA "
                           f"torch tensors; got {where}")


def _hold_stream() -> None:
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(_SLEEP_CYCLES)


def profile(layer_or_x, *args, reps: int = 20, warmup: int = 3, plot: str | None = None, verbose: bool = True,
            **kwargs) -> dict:
    """Per-stage times (ms) of one MoE call on the cute kernels; prints a table, returns a dict.

    Forms:

    - ``profile(layer, x, shared_output=None)``: a ``cute_moe.nn.MoE`` on ``x`` [..., H];
    - ``profile(x, w1, w2, router_weight=rw, top_k=k, **options)``: ``cute_moe.moe``'s arguments
      (routing, activation, biases, shared_output);
    - ``profile(x, w1, w2, topk_weights, topk_ids, **options)``: ``cute_moe.fused_moe``'s arguments;
      there is no route stage (reported as 0).

    Returns ``{"route", "plan", "permute", "gemm1", "gemm2", "combine": ms, "sum": their sum,
    "call": the whole call in ms, "tokens": T}``. ``plot``: a path for a matplotlib bar chart
    (skipped with a warning if matplotlib is missing). Needs CUDA inputs on a GPU where the cute
    backend runs this call (RuntimeError / NotImplementedError otherwise).
    """
    from . import api
    from .nn import MoE

    if isinstance(layer_or_x, MoE):
        layer, x = layer_or_x, args[0]
        _gpu_only(x)
        flat = x.reshape(-1, x.shape[-1])
        shared = kwargs.pop("shared_output", None)
        if kwargs or len(args) > 1:
            raise TypeError("profile(layer, x, shared_output=None): unexpected arguments")
        call = dict(router_weight=layer.router_weight, top_k=layer.top_k, **layer.routing,
                    correction_bias=layer.correction_bias, activation=layer.activation, w1_bias=layer.w1_bias,
                    w2_bias=layer.w2_bias, quant=layer.quantized_weights(),
                    apply_router_weight_on_input=layer.apply_router_weight_on_input,
                    shared_output=None if shared is None else shared.reshape(flat.shape))
        x, w1, w2, topk = flat, layer.w1, layer.w2, None
    else:
        x = layer_or_x
        _gpu_only(x)
        w1, w2, *rest = args
        call = dict(kwargs)
        topk = tuple(rest) if rest else (call.pop("topk_weights", None), call.pop("topk_ids", None))
        if len(topk) != 2:
            raise TypeError("profile(x, w1, w2, topk_weights, topk_ids, ...): expected both routing tensors")
        if topk[0] is None:
            topk = None
    expert_opts = {k: call.pop(k, d) for k, d in (("activation", "silu"), ("w1_bias", None), ("w2_bias", None),
                                                   ("quant", None), ("apply_router_weight_on_input", False),
                                                   ("shared_output", None))}
    if topk is None:
        kw, num_experts, router_weight, routing = api._check_moe_args(
            x, call.pop("router_weight"), w1, w2, call.pop("top_k"), **{**_ROUTING_DEFAULTS, **call},
            **expert_opts, out=None, backend="cute")
        api._select("route", "cute", dict(router_logits=x, **routing))
    else:
        if call:
            raise TypeError(f"profile: unexpected arguments {sorted(call)}")
        kw, num_experts = api._check_fused_moe_args(x, w1, w2, *topk, **expert_opts, out=None, backend="cute")
        router_weight = routing = None
    api._select("fused_moe", "cute", kw)  # raises NotImplementedError with the reason
    cute_layer = api._load_layer()[0]
    result = _measure(cute_layer, kw, router_weight, routing, topk, reps, warmup)
    result["tokens"] = x.shape[0]
    if verbose:
        print(_table(result, x, w1, w2, num_experts, kw["topk_ids"].shape[1] if topk else routing["top_k"]))
    if plot is not None:
        _plot(result, plot)
    return result


_ROUTING_DEFAULTS = dict(scoring="softmax", renormalize=False, num_groups=None, topk_groups=None,
                         correction_bias=None, routed_scaling_factor=1.0)


def _measure(layer, kw: dict, router_weight, routing, topk, reps: int, warmup: int) -> dict:
    names = ("start",) + (STAGES if topk is None else STAGES[1:])
    events = [{n: torch.cuda.Event(enable_timing=True) for n in names} for _ in range(reps)]
    calls = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]

    def once(marks):
        hook = None if marks is None else (lambda name: marks[name].record())
        if hook is not None:
            hook("start")
        if topk is None:
            logits = layer.logits(kw["x"], router_weight)
            kw["topk_weights"], kw["topk_ids"] = layer.route(router_logits=logits, **routing)
            if hook is not None:
                hook("route")
        layer.fused_moe(**kw, stage_hook=hook)

    for _ in range(warmup):
        once(None)
    torch.cuda.synchronize()
    for marks in events:
        _hold_stream()
        once(marks)
    for start, end in calls:
        _hold_stream()
        start.record()
        once(None)
        end.record()
    torch.cuda.synchronize()
    out = {}
    for prev, name in zip(names, names[1:]):
        out[name] = statistics.median(m[prev].elapsed_time(m[name]) for m in events)
    out.setdefault("route", 0.0)
    out = {s: out[s] for s in STAGES}
    out["sum"] = sum(out.values())
    out["call"] = statistics.median(s.elapsed_time(e) for s, e in calls)
    return out


def _table(r: dict, x, w1, w2, num_experts: int, top_k: int) -> str:
    hidden, inter = x.shape[1], w2.shape[2] if w2 is not None else 0
    lines = [f"cute_moe.profile: T={x.shape[0]} E={num_experts} k={top_k} H={hidden} I={inter} "
             f"{str(x.dtype).removeprefix('torch.')} on {torch.cuda.get_device_name(x.device)} (median ms)",
             f"{'stage':<10}{'ms':>10}{'%':>8}"]
    lines += [f"{s:<10}{r[s]:>10.4f}{100 * r[s] / r['sum'] if r['sum'] else 0:>8.1f}" for s in STAGES]
    lines += [f"{'sum':<10}{r['sum']:>10.4f}{100.0:>8.1f}", f"{'call':<10}{r['call']:>10.4f}"]
    return "\n".join(lines)


def _plot(r: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn(f"cute_moe.profile: matplotlib is not installed, no plot written to {path}", stacklevel=3)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(STAGES, [r[s] for s in STAGES], color="tab:blue")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"cute_moe stages, T={r['tokens']} (sum {r['sum']:.3f} ms, call {r['call']:.3f} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
