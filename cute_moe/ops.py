"""torch custom ops (``torch.library``) so ``torch.compile(fullgraph=True)`` can trace cute-moe calls.

``cute_moe::route``, ``cute_moe::fused_moe`` and ``cute_moe::moe`` are functional (they return new
tensors and mutate nothing) and opaque to the compiler. Their eager implementation is the normal
backend dispatch of :mod:`cute_moe.api` (cute kernels on sm_90a when they support the call, else the
reference), so ``cute_moe.last_backend()`` still reports what ran. Their fake (meta) implementation
runs the API's argument checks on the fake tensors, once at trace time, and returns empty results
of the right shape; the eager implementation then skips the checks (no duplicated validation).

You do not call these ops yourself: under ``torch.compile`` the public functions ``cute_moe.route``,
``fused_moe`` and ``moe`` (and so ``cute_moe.nn.MoE``) switch to them
(``torch.compiler.is_compiling()``); eager calls do not go through the dispatcher at all, so eager
host overhead is unchanged. ``out=`` becomes ``out.copy_(result)`` in the compiled graph. fp8
weights travel as their four tensors plus the mode string; cupy arrays are not supported under
torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import api
from .quant import QuantizedWeights


def _quant(w1_q, w1_scale, w2_q, w2_scale, mode) -> QuantizedWeights | None:
    return None if mode is None else QuantizedWeights(w1_q, w1_scale, w2_q, w2_scale, mode)


@torch.library.custom_op("cute_moe::route", mutates_args=())
def route(router_logits: Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: Optional[int],
          topk_groups: Optional[int], correction_bias: Optional[Tensor], routed_scaling_factor: float,
          backend: str) -> tuple[Tensor, Tensor]:
    """cute_moe.route: (topk_weights float32 [T, k], topk_ids int32 [T, k])."""
    kwargs = dict(router_logits=router_logits, top_k=top_k, scoring=scoring, renormalize=renormalize,
                  num_groups=num_groups, topk_groups=topk_groups, correction_bias=correction_bias,
                  routed_scaling_factor=routed_scaling_factor)
    weights, ids, api._state.backend = api._route(kwargs, backend)
    return weights, ids


@route.register_fake
def _route_fake(router_logits, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
                routed_scaling_factor, backend):
    api._check_route_args(router_logits, top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                          topk_groups=topk_groups, correction_bias=correction_bias,
                          routed_scaling_factor=routed_scaling_factor, backend=backend)
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty(num_tokens, top_k, dtype=torch.float32),
            router_logits.new_empty(num_tokens, top_k, dtype=torch.int32))


@torch.library.custom_op("cute_moe::fused_moe", mutates_args=())
def fused_moe(x: Tensor, w1: Optional[Tensor], w2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
              activation: str, w1_bias: Optional[Tensor], w2_bias: Optional[Tensor], w1_q: Optional[Tensor],
              w1_scale: Optional[Tensor], w2_q: Optional[Tensor], w2_scale: Optional[Tensor],
              quant_mode: Optional[str], apply_router_weight_on_input: bool, shared_output: Optional[Tensor],
              backend: str) -> Tensor:
    """cute_moe.fused_moe (without ``out``): [T, H] in x's dtype."""
    kwargs = dict(x=x, w1=w1, w2=w2, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias,
                  quant=_quant(w1_q, w1_scale, w2_q, w2_scale, quant_mode),
                  apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output,
                  out=None, topk_weights=topk_weights, topk_ids=topk_ids)
    num_experts = (w1 if quant_mode is None else w1_q).shape[0]
    result, api._state.backend = api._fused_moe(kwargs, num_experts, backend)
    return result


@fused_moe.register_fake
def _fused_moe_fake(x, w1, w2, topk_weights, topk_ids, activation, w1_bias, w2_bias, w1_q, w1_scale, w2_q,
                    w2_scale, quant_mode, apply_router_weight_on_input, shared_output, backend):
    api._check_fused_moe_args(x, w1, w2, topk_weights, topk_ids, activation=activation, w1_bias=w1_bias,
                              w2_bias=w2_bias, quant=_quant(w1_q, w1_scale, w2_q, w2_scale, quant_mode),
                              apply_router_weight_on_input=apply_router_weight_on_input,
                              shared_output=shared_output, out=None, backend=backend)
    return x.new_empty(x.shape)


@torch.library.custom_op("cute_moe::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, w1: Optional[Tensor], w2: Optional[Tensor], top_k: int, scoring: str,
        renormalize: bool, num_groups: Optional[int], topk_groups: Optional[int], correction_bias: Optional[Tensor],
        routed_scaling_factor: float, activation: str, w1_bias: Optional[Tensor], w2_bias: Optional[Tensor],
        w1_q: Optional[Tensor], w1_scale: Optional[Tensor], w2_q: Optional[Tensor], w2_scale: Optional[Tensor],
        quant_mode: Optional[str], apply_router_weight_on_input: bool, shared_output: Optional[Tensor],
        backend: str) -> Tensor:
    """cute_moe.moe (without ``out``): [T, H] in x's dtype."""
    kwargs = dict(x=x, w1=w1, w2=w2, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias,
                  quant=_quant(w1_q, w1_scale, w2_q, w2_scale, quant_mode),
                  apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output,
                  out=None)
    routing = dict(top_k=top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                   topk_groups=topk_groups, correction_bias=correction_bias,
                   routed_scaling_factor=routed_scaling_factor)
    num_experts = (w1 if quant_mode is None else w1_q).shape[0]
    return api._moe(kwargs, num_experts, router_weight, routing, backend)


@moe.register_fake
def _moe_fake(x, router_weight, w1, w2, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
              routed_scaling_factor, activation, w1_bias, w2_bias, w1_q, w1_scale, w2_q, w2_scale, quant_mode,
              apply_router_weight_on_input, shared_output, backend):
    api._check_moe_args(x, router_weight, w1, w2, top_k, scoring=scoring, renormalize=renormalize,
                        num_groups=num_groups, topk_groups=topk_groups, correction_bias=correction_bias,
                        routed_scaling_factor=routed_scaling_factor, activation=activation, w1_bias=w1_bias,
                        w2_bias=w2_bias, quant=_quant(w1_q, w1_scale, w2_q, w2_scale, quant_mode),
                        apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output,
                        out=None, backend=backend)
    return x.new_empty(x.shape)
