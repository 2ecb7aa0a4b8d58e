"""Public entry points: argument checks, backend dispatch, torch/cupy in and out.

``backend="reference"`` runs :mod:`cute_moe.reference`; ``"cute"`` runs the GPU kernels of
``cute_moe.layer`` and raises ``NotImplementedError`` (with the reason) when they cannot take the
call; ``"auto"`` picks cute when it can, else the reference. :func:`last_backend` says which ran.

The cute kernel module hook: ``cute_moe.layer`` must provide

- ``unsupported_reason(op, **kwargs) -> str | None``: None if its kernels run these inputs;
- ``route(**kwargs) -> (topk_weights float32 [T, k], topk_ids int32 [T, k])`` for op ``"route"``;
- ``fused_moe(**kwargs) -> [T, H] tensor`` for op ``"fused_moe"``, written into ``kwargs["out"]``
  when it is not None;
- ``moe(router_weight=, routing=, **kwargs) -> [T, H] tensor``: the whole layer, for ``moe`` calls
  whose experts it runs (``routing``: route's keyword arguments without the logits);
- ``logits(x, router_weight)``: float32 router logits, for ``moe`` calls it routes but whose experts
  run on the reference;
- optionally ``decode_launch(op, **kwargs)``: launch data the API may memoize per call signature and
  later hand to ``decode.run_moe`` / ``decode.run_experts`` directly (see ``_FAST``);

where ``kwargs`` are the public function's keyword arguments without ``backend`` (torch tensors,
already validated). Only non-CPU inputs are offered to it; route/fused_moe are not called for T == 0
(the API returns the empty result itself).
"""

from __future__ import annotations

import importlib
import sys
import threading

import torch

from .interop import array_kind, as_torch, to_kind
from .quant import QuantizedWeights
from .workspace import Workspace
from .reference import experts_reference, route_reference, router_logits_reference
from .validate import (BACKENDS, check_choice, check_experts, check_ids_in_range, check_route,
                       check_router_weight, check_routing, check_topk, check_weight_on_input, check_x,
                       debug_checks_enabled)

_LAYER = f"{__package__}.layer"
_layer_missing: str | None = None
_state = threading.local()


# Decode-path memo: the layer's launch data per call signature (every tensor argument's shape, strides,
# dtype, device and 16-byte alignment, every option, decode's switches), or False for signatures that
# take the full path. A signature whose call passed the checks and took the one-kernel decode path
# passes them again and takes the same kernel, so a repeated call skips straight to the launch: at
# decode sizes host time per call is part of the layer's latency.
_FAST: dict = {}
_FAST_MAX = 4096
_DECODE = f"{__package__}.decode"


def _sig(t):
    """What the checks and the path choice read of a tensor argument (None passes through)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def _decode_switches(x, quant, backend: str):
    """decode's switches when the decode path may take a call on ``x`` (a torch tensor), else None."""
    d = sys.modules.get(_DECODE)
    if (d is None or quant is not None or backend == "reference" or not isinstance(x, torch.Tensor)
            or not 0 < x.shape[0] <= d.MAX_TOKENS or debug_checks_enabled()):
        return None
    return d.MAX_TOKENS, d.CONFIG, d.ROUTE_IN_KERNEL


def _remember(key, op: str, **kw) -> None:
    """After a full-path call that ran on cute: memoize the signature's decode launch (or False)."""
    if _state.backend != "cute":
        return
    launch = getattr(sys.modules.get(_LAYER), "decode_launch", None)
    if len(_FAST) >= _FAST_MAX:
        _FAST.clear()
    _FAST[key] = (launch(op, **kw) if launch is not None else None) or False


def last_backend() -> str | None:
    """'cute' or 'reference': the backend of this thread's last route/fused_moe/moe call (None before
    any). For ``moe`` it is 'cute' only if both routing and the experts ran on cute kernels."""
    return getattr(_state, "backend", None)


def _load_layer():
    """(the cute kernel module or None, suffix explaining an import failure); failures are cached."""
    global _layer_missing
    module = sys.modules.get(_LAYER)
    if module is not None or _layer_missing is not None:
        return module, _layer_missing
    try:
        return importlib.import_module(_LAYER), None
    except ImportError as e:
        _layer_missing = "" if e.name == _LAYER else f" ({e})"
        return None, _layer_missing


def _cute_unsupported_reason(op: str, **kwargs) -> str | None:
    """Why the cute kernels cannot run ``op`` on these (validated) arguments, or None if they can."""
    first = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    if first.device.type == "cpu":
        return "inputs are on the CPU"
    layer, missing = _load_layer()
    if layer is None:
        return f"the cute kernels for {op} are not available in this build{missing}"
    return layer.unsupported_reason(op, **kwargs)


def _select(op: str, backend: str, kwargs: dict) -> str:
    """The backend that runs this call: 'cute' or 'reference'."""
    if backend == "reference":
        return "reference"
    reason = _cute_unsupported_reason(op, **kwargs)
    if reason is None:
        return "cute"
    if backend == "cute":
        raise NotImplementedError(f"backend='cute' cannot run this call: {reason}")
    return "reference"


def _route(kwargs: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run routing on the selected backend: (topk_weights, topk_ids, backend name)."""
    name = _select("route", backend, kwargs)
    logits, top_k = kwargs["router_logits"], kwargs["top_k"]
    if logits.shape[0] == 0:
        empty = logits.new_empty(0, top_k, dtype=torch.float32)
        return empty, empty.to(torch.int32), name
    impl = _load_layer()[0].route if name == "cute" else route_reference
    return (*impl(**kwargs), name)


def _fused_moe(kwargs: dict, num_experts: int, backend: str) -> tuple[torch.Tensor, str]:
    """Run the experts on the selected backend: (output, backend name)."""
    name = _select("fused_moe", backend, kwargs)
    x, out = kwargs["x"], kwargs["out"]
    if name == "reference" or debug_checks_enabled():
        check_ids_in_range(kwargs["topk_ids"], num_experts)
    if x.shape[0] == 0:
        result = x.new_empty(0, x.shape[1])
    elif name == "cute":
        result = _load_layer()[0].fused_moe(**kwargs)
    else:
        result = experts_reference(**{k: v for k, v in kwargs.items() if k not in ("out", "workspace")})
    if out is None:
        return result, name
    if result is not out:
        out.copy_(result)
    return out, name


def route(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
          num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
          routed_scaling_factor: float = 1.0, backend: str = "auto"):
    """Top-k expert selection for ``router_logits`` [T, E] (torch tensor or cupy array).

    Returns (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k]) in the caller's array
    type. Semantics (scoring, groups, correction bias, tie-breaking toward the lower expert index)
    are those of :func:`cute_moe.reference.route_reference`; model presets are in
    ``cute_moe.ROUTING_PRESETS``. NaN logits give NaN weights for that token.
    """
    if torch.compiler.is_compiling():  # torch.compile: the custom op cute_moe::route (cute_moe/ops.py)
        return torch.ops.cute_moe.route(router_logits, top_k, scoring, renormalize, num_groups, topk_groups,
                                        correction_bias, float(routed_scaling_factor), backend)
    kind = array_kind(router_logits)
    kwargs = _check_route_args(router_logits, top_k, scoring=scoring, renormalize=renormalize,
                               num_groups=num_groups, topk_groups=topk_groups, correction_bias=correction_bias,
                               routed_scaling_factor=routed_scaling_factor, backend=backend)
    weights, ids, _state.backend = _route(kwargs, backend)
    return to_kind(weights, kind), to_kind(ids, kind)


def _check_route_args(router_logits, top_k, *, scoring, renormalize, num_groups, topk_groups, correction_bias,
                      routed_scaling_factor, backend) -> dict:
    """route's checks; returns the torch kwargs of the backends' route."""
    kwargs = dict(router_logits=as_torch(router_logits, "router_logits"), top_k=top_k, scoring=scoring,
                  renormalize=renormalize, num_groups=num_groups, topk_groups=topk_groups,
                  correction_bias=as_torch(correction_bias, "correction_bias"),
                  routed_scaling_factor=routed_scaling_factor)
    check_choice("backend", backend, BACKENDS)
    check_route(kwargs["router_logits"], top_k, scoring=scoring, num_groups=num_groups,
                topk_groups=topk_groups, correction_bias=kwargs["correction_bias"])
    return kwargs


def _expert_kwargs(x, w1, w2, *, activation, w1_bias, w2_bias, quant, apply_router_weight_on_input,
                   shared_output, out, workspace=None) -> tuple[dict, int]:
    """Torch views of the expert-stage arguments, checked; returns (kwargs, E)."""
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"workspace: expected a cute_moe.Workspace or None, got {type(workspace).__name__}")
    kwargs = dict(x=as_torch(x, "x"), w1=as_torch(w1, "w1"), w2=as_torch(w2, "w2"), activation=activation,
                  w1_bias=as_torch(w1_bias, "w1_bias"), w2_bias=as_torch(w2_bias, "w2_bias"), quant=quant,
                  apply_router_weight_on_input=apply_router_weight_on_input,
                  shared_output=as_torch(shared_output, "shared_output"), out=as_torch(out, "out"),
                  workspace=workspace)
    check_x(kwargs["x"])
    num_experts = check_experts(kwargs["x"], kwargs["w1"], kwargs["w2"], activation=activation,
                                w1_bias=kwargs["w1_bias"], w2_bias=kwargs["w2_bias"], quant=quant,
                                shared_output=kwargs["shared_output"], out=kwargs["out"])
    return kwargs, num_experts


def fused_moe(x, w1, w2, topk_weights, topk_ids, *, activation: str = "silu", w1_bias=None, w2_bias=None,
              quant: QuantizedWeights | None = None, apply_router_weight_on_input: bool = False,
              shared_output=None, out=None, workspace: Workspace | None = None, backend: str = "auto"):
    """Routed experts: out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) (+ shared_output).

    x [T, H]; w1 [E, 2I, H] ([gate | up] rows); w2 [E, H, I]; topk_weights/topk_ids [T, k];
    biases [E, 2I] / [E, H]; ``activation`` in ACTIVATIONS. With ``quant`` (a QuantizedWeights) the
    fp8 weights come from it and w1, w2 must be None; its scales must be finite and > 0 (ValueError
    otherwise; each scale tensor is read once, see QuantizedWeights.check_scales), and both GEMMs run
    in fp8 on the cute backend too (dynamic activation scales of quant.mode, as the reference
    defines them). ``apply_router_weight_on_input`` (Llama-4,
    top_k == 1) scales x by the weight instead of the output. Returns [T, H] in x's dtype and array
    type, written into ``out`` when given. NaN inputs propagate to the affected tokens. topk_ids
    must lie in [0, E): checked on the reference path, and on the cute path only with debug checks
    (``set_debug_checks(True)`` / ``CUTE_MOE_DEBUG=1``) because the check syncs with the host.
    ``workspace`` (a :class:`cute_moe.Workspace`, one per stream): the cute path's intermediate
    tensors reuse its memory, so with ``out`` too an eager call allocates nothing once the workspace
    has grown (ignored by the reference backend and under torch.compile).
    """
    if torch.compiler.is_compiling():  # torch.compile: the custom op cute_moe::fused_moe (cute_moe/ops.py)
        result = torch.ops.cute_moe.fused_moe(x, w1, w2, topk_weights, topk_ids, activation, w1_bias, w2_bias,
                                              *_quant_tensors(quant), apply_router_weight_on_input,
                                              shared_output, backend)
        return result if out is None else out.copy_(result)
    key = entry = None
    if (switches := _decode_switches(x, quant, backend)) is not None:
        try:  # (cupy arrays and unhashable options have no signature: the full path takes them)
            key = ("fused_moe", _sig(x), _sig(w1), _sig(w2), _sig(topk_weights), _sig(topk_ids), activation,
                   _sig(w1_bias), _sig(w2_bias), apply_router_weight_on_input, _sig(shared_output), _sig(out),
                   type(workspace), backend, switches)
            entry = _FAST.get(key)
        except (AttributeError, TypeError):
            key = None
        if entry:
            result = sys.modules[_LAYER].decode.run_experts(entry, x, w1, w2, topk_weights, topk_ids, w1_bias,
                                                            w2_bias, shared_output, out, workspace)
            if result is not None:
                _state.backend = "cute"
                return result
    kind = array_kind(x)
    kwargs, num_experts = _check_fused_moe_args(
        x, w1, w2, topk_weights, topk_ids, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output, out=out,
        backend=backend, workspace=workspace)
    result, _state.backend = _fused_moe(kwargs, num_experts, backend)
    if key is not None and entry is None:
        _remember(key, "fused_moe", **kwargs)
    return out if out is not None else to_kind(result, kind)


def _quant_tensors(quant: QuantizedWeights | None) -> tuple:
    """(w1_q, w1_scale, w2_q, w2_scale, mode) of ``quant`` (all None without it): the custom ops' form."""
    if quant is None:
        return None, None, None, None, None
    return quant.w1_q, quant.w1_scale, quant.w2_q, quant.w2_scale, quant.mode


def _check_fused_moe_args(x, w1, w2, topk_weights, topk_ids, *, activation, w1_bias, w2_bias, quant,
                          apply_router_weight_on_input, shared_output, out, backend,
                          workspace=None) -> tuple[dict, int]:
    """fused_moe's checks; returns (the torch kwargs of the backends' fused_moe, E)."""
    check_choice("backend", backend, BACKENDS)
    kwargs, num_experts = _expert_kwargs(
        x, w1, w2, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output, out=out,
        workspace=workspace)
    kwargs["topk_weights"] = as_torch(topk_weights, "topk_weights")
    kwargs["topk_ids"] = as_torch(topk_ids, "topk_ids")
    x_t = kwargs["x"]
    top_k = check_topk(kwargs["topk_weights"], kwargs["topk_ids"], x_t.shape[0], num_experts, x_t.device)
    check_weight_on_input(apply_router_weight_on_input, top_k)
    return kwargs, num_experts


def moe(x, router_weight, w1, w2, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
        num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
        routed_scaling_factor: float = 1.0, activation: str = "silu", w1_bias=None, w2_bias=None,
        quant: QuantizedWeights | None = None, apply_router_weight_on_input: bool = False,
        shared_output=None, out=None, workspace: Workspace | None = None, backend: str = "auto"):
    """The whole MoE layer: router logits x @ router_weight.T (float32), :func:`route`, :func:`fused_moe`.

    ``router_weight`` is [E, H]; the other arguments are those of route and fused_moe (the router
    logits and top-k outputs are still allocated with a workspace: [T, E] and [T, k]). Every
    argument is checked before any work starts. :func:`last_backend` reports 'cute' only if both
    steps ran on cute kernels.
    """
    if torch.compiler.is_compiling():  # torch.compile: the custom op cute_moe::moe (cute_moe/ops.py)
        result = torch.ops.cute_moe.moe(x, router_weight, w1, w2, top_k, scoring, renormalize, num_groups,
                                        topk_groups, correction_bias, float(routed_scaling_factor), activation,
                                        w1_bias, w2_bias, *_quant_tensors(quant), apply_router_weight_on_input,
                                        shared_output, backend)
        return result if out is None else out.copy_(result)
    key = entry = None
    if (switches := _decode_switches(x, quant, backend)) is not None:
        try:  # (cupy arrays and unhashable options have no signature: the full path takes them)
            key = _moe_key(x, router_weight, w1, w2, top_k, scoring, renormalize, num_groups, topk_groups,
                           correction_bias, activation, w1_bias, w2_bias, apply_router_weight_on_input,
                           shared_output, out, workspace, backend, switches)
            entry = _FAST.get(key)
        except (AttributeError, TypeError):
            key = None
        if entry:
            result = sys.modules[_LAYER].decode.run_moe(entry, x, router_weight, w1, w2, correction_bias,
                                                        routed_scaling_factor, w1_bias, w2_bias, shared_output, out,
                                                        workspace)
            if result is not None:
                _state.backend = "cute"
                return result
    kind = array_kind(x)
    kwargs, num_experts, router_weight, routing = _check_moe_args(
        x, router_weight, w1, w2, top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
        topk_groups=topk_groups, correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
        activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output, out=out,
        backend=backend, workspace=workspace)
    result = _moe(kwargs, num_experts, router_weight, routing, backend)
    if key is not None and entry is None:
        _remember(key, "moe", router_weight=router_weight, routing=routing, **kwargs)
    return out if out is not None else to_kind(result, kind)


def _moe_key(x, router_weight, w1, w2, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
             activation, w1_bias, w2_bias, apply_router_weight_on_input, shared_output, out, workspace, backend,
             switches) -> tuple:
    """moe's call signature in _FAST (raises AttributeError/TypeError for arguments that have none)."""
    return ("moe", _sig(x), _sig(router_weight), _sig(w1), _sig(w2), top_k, scoring, renormalize, num_groups,
            topk_groups, _sig(correction_bias), activation, _sig(w1_bias), _sig(w2_bias),
            apply_router_weight_on_input, _sig(shared_output), _sig(out), type(workspace), backend, switches)


class BoundMoE:
    """:func:`moe` with everything but ``x`` (and ``shared_output`` / ``out``) bound once, for eager
    decode loops: ``bind_moe(router_weight, w1, w2, top_k, ...)(x, out=out)`` returns what
    ``moe(x, router_weight, w1, w2, top_k, ..., out=out)`` returns. The first call with a new
    signature of the per-call tensors (shape, strides, dtype, device, 16-byte alignment) runs moe's
    checks; a repeated one checks only that signature and, on the one-kernel decode path, launches the
    kernel directly: about half of moe's host time before the driver call. The bound tensors must keep
    their shapes, strides and storage (bind again after replacing or resizing one); their values may
    change between calls. Calls on other inputs (cupy arrays, prefill sizes, fp8, under
    torch.compile) are moe calls."""

    __slots__ = ("_args", "_kwargs", "_key_opts", "_memo", "_decode")

    def __init__(self, router_weight, w1, w2, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
                 num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
                 routed_scaling_factor: float = 1.0, activation: str = "silu", w1_bias=None, w2_bias=None,
                 quant: QuantizedWeights | None = None, apply_router_weight_on_input: bool = False,
                 workspace: Workspace | None = None, backend: str = "auto"):
        self._args = (router_weight, w1, w2, top_k)
        self._kwargs = dict(scoring=scoring, renormalize=renormalize, num_groups=num_groups, topk_groups=topk_groups,
                            correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                            activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
                            apply_router_weight_on_input=apply_router_weight_on_input, workspace=workspace,
                            backend=backend)
        # _moe_key's options between top_k and shared_output, in its order
        self._key_opts = (scoring, renormalize, num_groups, topk_groups, correction_bias, activation, w1_bias, w2_bias,
                          apply_router_weight_on_input)
        # what run_moe takes besides x, shared_output and out
        self._decode = (router_weight, w1, w2, correction_bias, routed_scaling_factor, w1_bias, w2_bias, workspace)
        self._memo: dict = {}  # per-call signature -> decode launch (False: moe takes such calls)

    def __call__(self, x, *, shared_output=None, out=None):
        kw = self._kwargs
        switches = _decode_switches(x, kw["quant"], kw["backend"])
        if switches is not None and not torch.compiler.is_compiling():
            try:
                key = (_sig(x), _sig(shared_output), _sig(out), switches)
                entry = self._memo.get(key)
            except (AttributeError, TypeError):
                key = entry = None
            if entry:
                rw, w1, w2, cb, scale, b1, b2, ws = self._decode
                result = sys.modules[_LAYER].decode.run_moe(entry, x, rw, w1, w2, cb, scale, b1, b2, shared_output,
                                                            out, ws)
                if result is not None:
                    _state.backend = "cute"
                    return result
            elif entry is None and key is not None:  # a new signature: moe checks it, then its launch is kept
                result = moe(x, *self._args, shared_output=shared_output, out=out, **kw)
                try:
                    entry = _FAST.get(_moe_key(x, *self._args, *self._key_opts, shared_output, out, kw["workspace"],
                                               kw["backend"], switches))
                except (AttributeError, TypeError):
                    entry = None
                if len(self._memo) >= 64:
                    self._memo.clear()
                self._memo[key] = entry or False
                return result
        return moe(x, *self._args, shared_output=shared_output, out=out, **kw)


def bind_moe(router_weight, w1, w2, top_k: int, **options) -> BoundMoE:
    """A :class:`BoundMoE`: :func:`moe` with these arguments bound (``options``: moe's keyword
    arguments other than ``shared_output`` and ``out``, which each call takes)."""
    return BoundMoE(router_weight, w1, w2, top_k, **options)


def _check_moe_args(x, router_weight, w1, w2, top_k, *, scoring, renormalize, num_groups, topk_groups,
                    correction_bias, routed_scaling_factor, activation, w1_bias, w2_bias, quant,
                    apply_router_weight_on_input, shared_output, out, backend,
                    workspace=None) -> tuple[dict, int, torch.Tensor, dict]:
    """moe's checks; returns (expert kwargs, E, router_weight, routing kwargs without the logits)."""
    check_choice("backend", backend, BACKENDS)
    kwargs, num_experts = _expert_kwargs(
        x, w1, w2, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        apply_router_weight_on_input=apply_router_weight_on_input, shared_output=shared_output, out=out,
        workspace=workspace)
    x_t = kwargs["x"]
    router_weight = as_torch(router_weight, "router_weight")
    correction_bias = as_torch(correction_bias, "correction_bias")
    check_router_weight(router_weight, num_experts, x_t.shape[1], x_t.device)
    check_routing(num_experts, x_t.device, top_k, scoring=scoring, num_groups=num_groups,
                  topk_groups=topk_groups, correction_bias=correction_bias)
    check_weight_on_input(apply_router_weight_on_input, top_k)
    routing = dict(top_k=top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                   topk_groups=topk_groups, correction_bias=correction_bias,
                   routed_scaling_factor=routed_scaling_factor)
    return kwargs, num_experts, router_weight, routing


def _moe(kwargs: dict, num_experts: int, router_weight: torch.Tensor, routing: dict, backend: str) -> torch.Tensor:
    """The checked moe call: route, then the experts (sets this thread's last backend)."""
    layer = None if backend == "reference" else _load_layer()[0]
    x = kwargs["x"]
    if layer is not None and x.shape[0] and _select("fused_moe", backend, kwargs) == "cute":
        result = layer.moe(router_weight=router_weight, routing=routing, **kwargs)  # router, routing and experts
        _state.backend = "cute"
        out = kwargs["out"]
        if out is not None and result is not out:
            out.copy_(result)
        return result if out is None else out
    logits = router_logits_reference(x, router_weight) if layer is None else layer.logits(x, router_weight)
    route_kwargs = dict(router_logits=logits, **routing)
    kwargs["topk_weights"], kwargs["topk_ids"], route_backend = _route(route_kwargs, backend)
    result, experts_backend = _fused_moe(kwargs, num_experts, backend)
    _state.backend = "cute" if route_backend == experts_backend == "cute" else "reference"
    return result
