"""The fused MoE layer on GPU kernels (the ``cute`` backend behind `cute_moe.api`).

route (CuPy) -> plan (CuPy) -> permute (CuPy) -> GEMM1 + gated activation (CuTe DSL) ->
GEMM2 (CuTe DSL) -> combine with the router weights (CuPy, deterministic). :func:`moe` routes and
plans in one kernel (plan.route_and_plan); :func:`fused_moe` plans the ids it is given. Up to
``decode.MAX_TOKENS`` tokens (bf16/fp16) the experts run in one kernel instead, and :func:`moe`'s
router and routing with them (:mod:`cute_moe.decode`).

With ``quant=`` (fp8 e4m3 weights, :mod:`cute_moe.quant`) both GEMMs run in fp8 with the mode's
dynamic activation scales, as :func:`cute_moe.reference.experts_reference` defines them: the permute
quantizes x (per_token: one scale per row; blockwise: 1x128 groups; per_tensor: one scale from an
on-device amax of x), GEMM1 writes its activated output in x's dtype, :func:`cute_moe.permute.quantize_fp8`
quantizes it in the same mode for GEMM2, and GEMM2 writes x's dtype for the combine.

Everything runs on the caller's current stream with no host synchronization, so a call can be
captured in a CUDA graph and replayed with new inputs and new routings. (The fp8 weight scales are
checked once per scale tensor, with a sync, on the first eager call; see QuantizedWeights.check_scales.)
"""

from __future__ import annotations

import torch

from . import decode
from .gemm import grouped_gemm
from .permute import combine, permute, permute_fp8, permute_fp8_per_tensor, quantize_fp8
from .plan import make_plan, plan_buffer_ints, route_and_plan
from .quant import FP8_DTYPE, QuantizedWeights, TensorMemo
from .routing import route_gpu, router_logits

_GEMM_ARCHES = {(9, 0)}
_DTYPES = (torch.bfloat16, torch.float16)
_ACT_SCALING = {"per_tensor": "tensor", "per_token": "token", "blockwise": "block"}
_GEMM_SCALES = TensorMemo()  # weight scale -> its contiguous grouped-GEMM layout, when not a view


_ARCH: dict = {}


def _cuda_arch(t: torch.Tensor) -> tuple[int, int]:
    """Compute capability of ``t``'s device (cached: this runs on every call)."""
    index = t.device.index
    arch = _ARCH.get(index)
    if arch is None:
        arch = _ARCH[index] = torch.cuda.get_device_capability(t.device)
    return arch


def unsupported_reason(op: str, **kw) -> str | None:
    """Why the GPU kernels cannot run ``op`` on these (already validated) arguments, or None."""
    if op == "route":
        return None
    x, quant = kw["x"], kw.get("quant")
    arch = _cuda_arch(x)
    if arch not in _GEMM_ARCHES:
        return f"no grouped GEMM kernel for sm_{arch[0]}{arch[1]} yet (sm_90a is supported)"
    if x.dtype not in _DTYPES:
        return f"x has dtype {x.dtype}; the kernels take bfloat16 or float16"
    if kw.get("apply_router_weight_on_input"):
        return "apply_router_weight_on_input (Llama-4) has no fused kernel path yet"
    if quant is not None:
        return _fp8_unsupported_reason(x, quant)
    w1, w2 = kw["w1"], kw["w2"]
    hidden, inter = x.shape[1], w1.shape[1] // 2
    if hidden % 8 or inter % 8:
        return f"H={hidden} and I={inter} must be multiples of 8 (16-byte TMA rows)"
    if not (w1.is_contiguous() and w2.is_contiguous() and x.is_contiguous()):
        return "x, w1 and w2 must be contiguous"
    return None


def _fp8_unsupported_reason(x: torch.Tensor, quant: QuantizedWeights) -> str | None:
    """Why the fp8 kernels cannot run these (validated) fp8 arguments, or None."""
    hidden, inter = x.shape[1], quant.w1_q.shape[1] // 2
    if hidden % 16 or inter % 16:
        return f"fp8: H={hidden} and I={inter} must be multiples of 16 (fp8 GEMM K and 16-byte quantized rows)"
    if not (x.is_contiguous() and quant.w1_q.is_contiguous() and quant.w2_q.is_contiguous()):
        return "fp8: x, quant.w1_q and quant.w2_q must be contiguous"
    if x.data_ptr() % 16:
        return "fp8: x must be 16-byte aligned (the quantizing permute reads 16-byte vectors)"
    return None


def route(**kw):
    """GPU routing: (topk_weights float32 [T, k], topk_ids int32 [T, k])."""
    return route_gpu(**kw)


def logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32 (our kernel for one token, else torch.mm; see routing.router_logits)."""
    return router_logits(x, router_weight)


def moe(*, router_weight, routing: dict, **experts):
    """Router, routing and experts. A few tokens (the decode path): one kernel for all of it
    (:func:`cute_moe.decode.run_moe`) when it can route this configuration, else the routing
    kernel and the one-kernel experts. Otherwise the router logits, then
    :func:`cute_moe.plan.route_and_plan` (route + plan in one kernel where the tokens fit on the GPU
    at once) and :func:`fused_moe` on that plan. ``routing``: route_gpu's keyword arguments (top_k,
    scoring, ...); ``experts``: fused_moe's, without the top-k tensors."""
    x, quant, workspace = experts["x"], experts["quant"], experts.get("workspace")
    top_k = routing["top_k"]
    if _decode_reason(x, experts["w1"], experts["w2"], quant, top_k, None, experts["w1_bias"],
                      experts["w2_bias"], experts["shared_output"], experts["out"]) is None:
        lc = _routed_launch(router_weight, routing, experts)
        if lc is not None:
            result = decode.run_moe(lc, x, router_weight, experts["w1"], experts["w2"], routing["correction_bias"],
                                    routing["routed_scaling_factor"], experts["w1_bias"], experts["w2_bias"],
                                    experts["shared_output"], experts["out"], workspace)
            if result is not None:
                return result
        topk_weights, topk_ids = route_gpu(router_logits(x, router_weight), **routing)
        return fused_moe(topk_weights=topk_weights, topk_ids=topk_ids, decode_ok=True, **experts)
    logits = router_logits(x, router_weight)
    weights = experts["w1"] if quant is None else quant.w1_q
    num_experts, inter = weights.shape[0], weights.shape[1] // 2
    views = None
    if workspace is not None:
        views = _workspace_views(workspace, x, quant, num_experts, inter, x.shape[0] * top_k)
    topk_weights, topk_ids, plan = route_and_plan(logits, **routing, buffer=None if views is None else views["plan"])
    return fused_moe(topk_weights=topk_weights, topk_ids=topk_ids, plan=plan, views=views, **experts)


def _routed_launch(router_weight, routing: dict, experts: dict):
    """The launch data of the one-kernel layer (decode.moe_launch) for a decode-path call, or None
    when the kernel does not route this configuration."""
    route = decode.route_key(router_weight, routing["top_k"], routing["scoring"], routing["renormalize"],
                             routing["num_groups"], routing["topk_groups"], routing["correction_bias"])
    if isinstance(route, str):
        return None
    return decode.moe_launch(experts["x"], experts["w1"], route, top_k=routing["top_k"],
                             activation=experts["activation"], w1_bias=experts["w1_bias"],
                             w2_bias=experts["w2_bias"], shared_output=experts["shared_output"])


def decode_launch(op: str, **kw):
    """For the API's per-signature memo: the launch data the decode path uses for this validated
    ``op`` call ("moe": moe's keyword arguments; "fused_moe": fused_moe's), or None when the call
    takes another path. A pure function of the arguments' shapes, strides, dtypes, devices,
    alignment and options, so a later call with the same signature may launch it directly
    (decode.run_moe / decode.run_experts)."""
    x, top_k = kw["x"], (kw["routing"]["top_k"] if op == "moe" else kw["topk_ids"].shape[1])
    if _decode_reason(x, kw["w1"], kw["w2"], kw["quant"], top_k, kw.get("topk_ids"), kw["w1_bias"], kw["w2_bias"],
                      kw["shared_output"], kw["out"]) is not None:
        return None
    if op == "moe":
        return _routed_launch(kw["router_weight"], kw["routing"], kw)
    return decode.experts_launch(x, kw["w1"], kw["topk_weights"], kw["topk_ids"], activation=kw["activation"],
                                 w1_bias=kw["w1_bias"], w2_bias=kw["w2_bias"], shared_output=kw["shared_output"])


def fused_moe(*, x, w1, w2, topk_weights, topk_ids, activation, w1_bias, w2_bias, quant,
              apply_router_weight_on_input, shared_output, out, workspace=None, stage_hook=None, plan=None,
              views=None, decode_ok=False):
    """Experts of the MoE layer for already-routed tokens; writes ``out`` when given. With a
    :class:`cute_moe.workspace.Workspace` the intermediate tensors are views of its buffer. ``plan``:
    the routing plan of topk_ids when the caller made it (in the workspace's plan buffer, if any);
    ``views``: the workspace's views when the caller already took them; ``decode_ok``: the caller
    found that the one-kernel decode path takes this call (else it is checked here).

    ``stage_hook(name)`` (cute_moe.profile) is called after each stage is enqueued: "plan",
    "permute" (with quant: permute + quantize x), "gemm1" (with quant: GEMM1 + quantizing its
    output), "gemm2", "combine"."""
    def hook(name):
        if stage_hook is not None:
            stage_hook(name)

    if decode_ok or (plan is None and stage_hook is None and _decode_reason(
            x, w1, w2, quant, topk_ids.shape[1], topk_ids, w1_bias, w2_bias, shared_output, out) is None):
        result = decode.fused_moe_decode(x, w1, w2, topk_weights, topk_ids, activation=activation, w1_bias=w1_bias,
                                         w2_bias=w2_bias, shared_output=shared_output, out=out, workspace=workspace)
        if result is not None:
            return result
    weights = w1 if quant is None else quant.w1_q
    num_experts, inter = weights.shape[0], weights.shape[1] // 2
    ws = views
    if ws is None and workspace is not None:
        ws = _workspace_views(workspace, x, quant, num_experts, inter, topk_ids.numel())
    if plan is None:
        ids = topk_ids.to(torch.int32)
        plan = make_plan(ids, num_experts) if ws is None else make_plan(ids, num_experts, buffer=ws["plan"])
    hook("plan")
    if ws is None:
        ws = dict.fromkeys(("xp", "h", "y", "xq", "xs", "hq", "hs"))
    if quant is None:
        xp = permute(x, plan, out=ws["xp"])
        hook("permute")
        h = grouped_gemm(xp, w1, plan.cu_seqlens, activation=activation, bias=w1_bias, out=ws["h"],
                         segments_ready=True)
        hook("gemm1")
        y = grouped_gemm(h, w2, plan.cu_seqlens, bias=w2_bias, out=ws["y"], segments_ready=True)
    else:
        y = _fp8_experts(x, quant, plan, activation, w1_bias, w2_bias, hook, ws)
    hook("gemm2")
    result = combine(y, plan, topk_weights.float(), addend=shared_output, out=out)
    hook("combine")
    return result


def _decode_reason(x, w1, w2, quant, top_k: int, topk_ids, w1_bias, w2_bias, shared_output, out) -> str | None:
    """Why this call does not take the one-kernel decode path (:mod:`cute_moe.decode`), or None."""
    if quant is not None:
        return "fp8 runs the staged pipeline"
    return decode.unsupported_reason(x, w1, w2, top_k, topk_ids=topk_ids, w1_bias=w1_bias, w2_bias=w2_bias,
                                     shared_output=shared_output, out=out)


def _fp8_experts(x, quant: QuantizedWeights, plan, activation, w1_bias, w2_bias, hook, ws) -> torch.Tensor:
    """permute + quantize x -> fp8 GEMM1 (+ bias, activation) -> quantize -> fp8 GEMM2: [T*k, H] in
    x's dtype, rows in the plan's flat order; intermediates in ``ws``'s views (None: allocated).
    (The API checked quant's scales; grouped_gemm checks its b_scale again, once per scale tensor,
    for callers that skip the API checks.)"""
    mode, cu = quant.mode, plan.cu_seqlens
    if mode == "per_tensor":
        xq, x_scale = permute_fp8_per_tensor(x, plan, out=ws["xq"], out_scale=ws["xs"])
    else:
        xq, x_scale = permute_fp8(x, plan, scaling=_ACT_SCALING[mode], out=ws["xq"], out_scale=ws["xs"])
    hook("permute")
    h = grouped_gemm(xq, quant.w1_q, cu, activation=activation, bias=w1_bias, a_scale=x_scale,
                     b_scale=gemm_weight_scale(quant.w1_scale, mode), out_dtype=x.dtype, out=ws["h"],
                     segments_ready=True)
    hq, h_scale = quantize_fp8(h, scaling=_ACT_SCALING[mode], num_rows=cu[plan.num_experts:], out=ws["hq"],
                               out_scale=ws["hs"])
    hook("gemm1")
    return grouped_gemm(hq, quant.w2_q, cu, bias=w2_bias, a_scale=h_scale,
                        b_scale=gemm_weight_scale(quant.w2_scale, mode), out_dtype=x.dtype, out=ws["y"],
                        segments_ready=True)


def _workspace_views(workspace, x, quant, num_experts: int, inter: int, rows: int) -> dict:
    """The layer's intermediates for ``rows`` = T*k flat rows as views of ``workspace``: the plan's
    int32 buffer, then bf16 (xp, h, y) or fp8 (xq, xs, h, hq, hs, y) tensors."""
    hidden, dt = x.shape[1], x.dtype
    specs = {"plan": ((plan_buffer_ints(rows, num_experts),), torch.int32)}
    if quant is None:
        specs |= {"xp": ((rows, hidden), dt), "h": ((rows, inter), dt), "y": ((rows, hidden), dt)}
    else:
        def scale_shape(cols):
            return {"per_tensor": (2,), "per_token": (rows,), "blockwise": (-(-cols // 128), rows)}[quant.mode]

        specs |= {"xq": ((rows, hidden), FP8_DTYPE), "xs": (scale_shape(hidden), torch.float32),
                  "h": ((rows, inter), dt), "hq": ((rows, inter), FP8_DTYPE),
                  "hs": (scale_shape(inter), torch.float32), "y": ((rows, hidden), dt)}
    return dict(zip(specs, workspace.views(x.device, list(specs.values()))))


def gemm_weight_scale(scale: torch.Tensor, mode: str) -> torch.Tensor:
    """A QuantizedWeights scale in grouped_gemm's b_scale layout: per_tensor [E, 1, 1] -> [E],
    per_token [E, N, 1] -> [E, N], blockwise [E, N blocks, ceil(K/128)] as is. A view when the layout allows;
    otherwise a contiguous copy made once and reused while the scale tensor is alive and unmodified
    (not cached while a CUDA graph is being captured, where the copy only runs at replay)."""
    num_experts, n, k = scale.shape
    shape = {"per_tensor": (num_experts,), "per_token": (num_experts, n)}.get(mode, (num_experts, n, k))
    if scale.is_contiguous():
        return scale.view(shape)
    cached = _GEMM_SCALES.get(scale)
    if cached is not None:
        return cached
    copy = scale.reshape(shape).contiguous()
    if not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
        _GEMM_SCALES.put(scale, copy)
    return copy
