"""The fused MoE layer on GPU kernels (the ``cute`` backend behind `cute_moe.api`).

route (CuPy) -> plan (CuPy) -> permute (CuPy) -> GEMM1 + gated activation (CuTe DSL) ->
GEMM2 (CuTe DSL) -> combine with the router weights (CuPy, deterministic).

Everything runs on the caller's current stream with no host synchronization, so a call can be
captured in a CUDA graph and replayed with new inputs and new routings.
"""

from __future__ import annotations

import torch

from .gemm import grouped_gemm
from .permute import combine, permute
from .plan import make_plan
from .routing import route_gpu

_GEMM_ARCHES = {(9, 0)}
_DTYPES = (torch.bfloat16, torch.float16)


def _cuda_arch(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device)


def unsupported_reason(op: str, **kw) -> str | None:
    """Why the GPU kernels cannot run ``op`` on these (already validated) arguments, or None."""
    if op == "route":
        return None
    x, w1 = kw["x"], kw["w1"]
    arch = _cuda_arch(x)
    if arch not in _GEMM_ARCHES:
        return f"no grouped GEMM kernel for sm_{arch[0]}{arch[1]} yet (sm_90a is supported)"
    if kw.get("quant") is not None:
        return "fp8 grouped GEMM kernels are not implemented yet"
    if x.dtype not in _DTYPES:
        return f"x has dtype {x.dtype}; the kernels take bfloat16 or float16"
    if kw.get("apply_router_weight_on_input"):
        return "apply_router_weight_on_input (Llama-4) has no fused kernel path yet"
    hidden, inter = x.shape[1], w1.shape[1] // 2
    if hidden % 8 or inter % 8:
        return f"H={hidden} and I={inter} must be multiples of 8 (16-byte TMA rows)"
    if not (w1.is_contiguous() and kw["w2"].is_contiguous() and x.is_contiguous()):
        return "x, w1 and w2 must be contiguous"
    return None


def route(**kw):
    """GPU routing: (topk_weights float32 [T, k], topk_ids int32 [T, k])."""
    return route_gpu(**kw)


def fused_moe(*, x, w1, w2, topk_weights, topk_ids, activation, w1_bias, w2_bias, quant,
              apply_router_weight_on_input, shared_output, out, stage_hook=None):
    """Experts of the MoE layer for already-routed tokens; writes ``out`` when given.

    ``stage_hook(name)`` (cute_moe.profile) is called after each stage is enqueued: "plan",
    "permute", "gemm1", "gemm2", "combine"."""
    num_experts = w1.shape[0]
    plan = make_plan(topk_ids.to(torch.int32), num_experts)
    if stage_hook is not None:
        stage_hook("plan")
    xp = permute(x, plan)
    if stage_hook is not None:
        stage_hook("permute")
    h = grouped_gemm(xp, w1, plan.cu_seqlens, activation=activation, bias=w1_bias)
    if stage_hook is not None:
        stage_hook("gemm1")
    y = grouped_gemm(h, w2, plan.cu_seqlens, bias=w2_bias)
    if stage_hook is not None:
        stage_hook("gemm2")
    result = combine(y, plan, topk_weights.float(), addend=shared_output, out=out)
    if stage_hook is not None:
        stage_hook("combine")
    return result
