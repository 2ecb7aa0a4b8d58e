"""GPU top-k routing: one CuPy raw kernel (``kernels/routing.cu``), one warp per token.

Semantics are exactly :func:`cute_moe.reference.route_reference` (softmax or sigmoid scores in
float32, optional correction bias for selection only, group limiting, ties to the lower expert index,
ids in descending selection order, renormalization, routed scaling factor). Softmax and sigmoid use
the same float32 formulas as torch's CUDA kernels (``expf(x - max) / sum`` and ``1 / (1 + expf(-x))``)
so selection agrees with the reference run on the GPU; only the order of the softmax and
renormalization sums differs (weights within a few float32 ulps).

No host synchronization and no allocation sized by device data: safe inside CUDA graphs (run it
once eagerly before capture so the kernel is compiled and loaded).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import _nvrtc
from ._nvrtc import DTYPE_CODES, check_rows
from .interop import array_kind, as_torch, to_kind
from .reference import router_logits_reference

SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 1024
MAX_TOP_K = 32
MAX_GROUPS = 32
_WARPS = 4
_SOURCE = "routing.cu"
_fn_cache: dict[tuple, object] = {}


def defines(num_experts, top_k, logit_dt, scoring, bias_dt, num_groups, topk_groups, renormalize, *,
            warps: int = _WARPS, **extra) -> tuple:
    """The -D defines of route_select.cuh (plus ``extra``) as a sorted tuple."""
    return tuple(sorted(dict(
        NUM_E=num_experts, TOP_K=top_k, LOGIT_DT=logit_dt, SCORING=SCORINGS.index(scoring),
        HAS_BIAS=int(bias_dt is not None), BIAS_DT=bias_dt or 0, NUM_GROUPS=num_groups,
        TOPK_GROUPS=topk_groups, RENORM=int(bool(renormalize)), WARPS=warps, **extra).items()))


ROUTER_MAX_HIDDEN = 4096  # router_logits' own kernel (one token) up to this H, torch.mm above (as tested)
_ROUTER_SOURCE = "router.cu"
_ROUTER_WARPS = 4


def _router_defines(x_dt: int) -> tuple:
    return tuple(sorted(dict(X_DT=x_dt, WARPS=_ROUTER_WARPS).items()))


# (E, k, logit dtype, scoring, bias dtype, groups, topk groups, renormalize) covering every branch of
# route_select.cuh
SPECIALIZATION_CASES = [
    (8, 2, 2, "softmax", None, 0, 0, True),       # Mixtral
    (128, 4, 0, "softmax", None, 0, 0, True),     # GPT-OSS, fp32 logits
    (60, 4, 1, "softmax", None, 0, 0, False),     # Qwen2-MoE-like, E not a multiple of 32
    (256, 8, 2, "sigmoid", 0, 8, 4, True),        # DeepSeek-V3, fp32 bias (select_grouped256)
    (256, 8, 0, "sigmoid", 0, 8, 4, True),        # fp32 logits
    (256, 8, 2, "sigmoid", 2, 8, 4, True),        # bf16 bias
    (256, 8, 1, "sigmoid", None, 8, 4, True),     # fp16 logits, no bias (group max)
    (64, 4, 1, "sigmoid", 0, 8, 3, True),         # groups of 8 (shared-memory group scan)
    (16, 3, 0, "sigmoid", 0, 16, 5, True),        # groups of 1
    (128, 6, 2, "sigmoid", 0, 2, 1, False),       # groups of 64 (two slots per lane), no renorm
    (128, 1, 2, "sigmoid", None, 0, 0, False),    # Llama-4
    (512, 16, 2, "softmax", None, 16, 8, True),   # groups without bias (group max)
    (1024, 32, 0, "sigmoid", None, 0, 0, True),   # limits
]


def compile_specializations() -> list[tuple[str, dict]]:
    """Representative define sets covering every branch of routing.cu and router.cu (for the CPU
    compile check)."""
    return [(_SOURCE, dict(defines(*c))) for c in SPECIALIZATION_CASES] + [
        (_ROUTER_SOURCE, dict(_router_defines(dt))) for dt in (1, 2)]


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router logits x [T, H] @ router_weight[E, H].T in float32: [T, E] (torch tensors).

    One bf16/fp16 token on a CUDA device (decode; H <= ROUTER_MAX_HIDDEN and a multiple of 8, 16-byte
    aligned rows): one kernel of ours (``kernels/router.cu``: a warp per expert streams its weight row
    once; float32 sums in a fixed order), 1.3-2x faster than torch.mm there (H200); otherwise
    :func:`cute_moe.reference.router_logits_reference` (torch.mm with float32 output). Both accumulate
    exact 16-bit products in float32, in different orders: logits agree to float32 rounding, not
    bitwise."""
    num_tokens, hidden = x.shape
    dt = DTYPE_CODES.get(x.dtype)
    if (not x.is_cuda or num_tokens != 1 or hidden > ROUTER_MAX_HIDDEN or dt not in (1, 2)
            or router_weight.dtype != x.dtype or router_weight.device != x.device or hidden % 8
            or x.stride(1) != 1 or router_weight.stride(1) != 1 or router_weight.stride(0) % 8
            or x.data_ptr() % 16 or router_weight.data_ptr() % 16):
        return router_logits_reference(x, router_weight)
    out = torch.empty((1, router_weight.shape[0]), dtype=torch.float32, device=x.device)
    launch_router_kernel(x, router_weight, out, dt)
    return out


def launch_router_kernel(x: torch.Tensor, router_weight: torch.Tensor, out: torch.Tensor, dt: int) -> None:
    """Enqueue kernels/router.cu for the one token x [1, H] into out [1, E] (inputs already checked)."""
    num_experts, hidden = router_weight.shape
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = ("router", dev, dt)
    fn = _fn_cache.get(key)
    if fn is None:
        fn = _fn_cache[key] = _nvrtc.get_function(dev, _ROUTER_SOURCE, "router_logits", _router_defines(dt))
    _nvrtc.launch(fn, dev, -(-num_experts // _ROUTER_WARPS), _ROUTER_WARPS * 32,
                  (x.data_ptr(), router_weight.data_ptr(), router_weight.stride(0), out.data_ptr(),
                   np.int32(num_experts), np.int32(hidden)))


def _check_int(name: str, value, lo: int, hi: int, hi_note: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {lo} <= {name} <= {hi} ({hi_note}), got {value}")
    return value


def route_gpu(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
              num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
              routed_scaling_factor: float = 1.0, out=None):
    """Top-k routing of ``router_logits`` [T, E] (bf16/fp16/fp32, torch or cupy, on a CUDA device).

    Returns (topk_weights float32 [T, k], topk_ids int32 [T, k]) in the caller's array type;
    ``out=(weights, ids)`` writes into given buffers. E <= 1024, k <= 32, num_groups <= 32.
    """
    kind = array_kind(router_logits)
    r = prepare_route(router_logits, top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                      topk_groups=topk_groups, correction_bias=correction_bias,
                      routed_scaling_factor=routed_scaling_factor, out=out)
    launch_route(r)
    return to_kind(r.weights, kind), to_kind(r.ids, kind)


def launch_route(r: RouteCall) -> None:
    """Enqueue route_topk for a checked call (writes r.weights and r.ids)."""
    if r.num_tokens:
        key = (r.device_index, *r.key)
        fn = _fn_cache.get(key)
        if fn is None:
            fn = _fn_cache[key] = _nvrtc.get_function(r.device_index, _SOURCE, "route_topk",
                                                      defines(*r.key, warps=_WARPS))
        _nvrtc.launch(fn, r.device_index, (r.num_tokens + _WARPS - 1) // _WARPS, _WARPS * 32,
                      (*r.args, np.int32(r.num_tokens)))


class RouteCall(NamedTuple):
    """A checked routing call: its outputs, the kernel's specialization and leading arguments."""

    num_tokens: int
    num_experts: int
    device_index: int
    key: tuple           # (E, k, logit dtype, scoring, bias dtype, groups, topk groups, renormalize)
    args: tuple          # logits, row stride, bias, scaling, weights, ids
    weights: torch.Tensor
    ids: torch.Tensor


def prepare_route(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
                  num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
                  routed_scaling_factor: float = 1.0, out=None) -> RouteCall:
    """route_gpu's checks and outputs (allocated, or ``out``'s), for the routing kernels."""
    logits = as_torch(router_logits, "router_logits")
    bias = as_torch(correction_bias, "correction_bias")
    logit_dt = check_rows(logits, "router_logits", "[T, E]")
    num_tokens, num_experts = logits.shape
    _check_int("num_experts (router_logits.shape[1])", num_experts, 1, MAX_EXPERTS, "kernel limit")
    _check_int("top_k", top_k, 1, min(num_experts, MAX_TOP_K), "min(E, 32)")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    if not num_groups:
        if topk_groups:
            raise ValueError(f"topk_groups: only valid with num_groups, got topk_groups={topk_groups}")
        num_groups = topk_groups = 0
    else:
        _check_int("num_groups", num_groups, 1, min(num_experts, MAX_GROUPS), "min(E, 32)")
        if num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of E = {num_experts}, got {num_groups}")
        if topk_groups is None:
            raise ValueError("topk_groups: required with num_groups, got None")
        _check_int("topk_groups", topk_groups, 1, num_groups, "num_groups")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"top_k: expected <= topk_groups * E / num_groups = "
                             f"{topk_groups * (num_experts // num_groups)}, got {top_k}")
    bias_dt = None
    if bias is not None:
        bias_dt = DTYPE_CODES.get(bias.dtype)
        if bias_dt is None:
            raise TypeError(f"correction_bias: expected bf16, fp16 or fp32, got {bias.dtype}")
        if tuple(bias.shape) != (num_experts,) or not bias.is_contiguous():
            raise ValueError(f"correction_bias: expected a contiguous [E] = [{num_experts}] tensor, got shape "
                             f"{tuple(bias.shape)} strides {bias.stride()}")
        if bias.device != logits.device:
            raise ValueError(f"correction_bias: expected device {logits.device}, got {bias.device}")

    if out is None:
        weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    else:
        weights, ids = as_torch(out[0], "out[0]"), as_torch(out[1], "out[1]")
        for t, name, dt in ((weights, "out[0]", torch.float32), (ids, "out[1]", torch.int32)):
            if t.dtype != dt or tuple(t.shape) != (num_tokens, top_k) or not t.is_contiguous() \
                    or t.device != logits.device:
                raise ValueError(f"{name}: expected a contiguous {dt} [{num_tokens}, {top_k}] tensor on "
                                 f"{logits.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    dev = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    key = (num_experts, top_k, logit_dt, scoring, bias_dt, num_groups, topk_groups, bool(renormalize))
    args = (logits.data_ptr(), logits.stride(0), bias.data_ptr() if bias is not None else 0,
            np.float32(routed_scaling_factor), weights.data_ptr(), ids.data_ptr())
    return RouteCall(num_tokens, num_experts, dev, key, args, weights, ids)
