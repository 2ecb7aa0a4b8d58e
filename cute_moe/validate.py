"""Argument checks for the public API: cheap (metadata only, no allocation, no host sync).

Every error names the argument and says what was expected and what was given: ``TypeError`` for a
wrong type or dtype, ``ValueError`` for everything else. Two checks read tensor values and so sync
with the host: :func:`check_ids_in_range`, which the API runs on the reference path always and on
the cute path only with debug checks on (:func:`set_debug_checks` or ``CUTE_MOE_DEBUG=1``), and the
fp8 weight-scale check (finite, > 0; :meth:`QuantizedWeights.check_scales`), which reads each scale
tensor once and remembers it while it is unmodified, and is skipped during CUDA graph capture.
"""

from __future__ import annotations

import os

import torch

from .quant import BLOCK, FP8_DTYPE, QUANT_MODES, QuantizedWeights, weight_scale_blocks
from .reference import ACTIVATIONS, SCORINGS

BACKENDS = ("auto", "reference", "cute")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)

_debug_checks = os.environ.get("CUTE_MOE_DEBUG", "0") not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Turn on checks that sync with the host on the cute path: topk_ids in [0, E), and the
    per-call fp8 activation scales (``a_scale``) of ``cute_moe.gemm.grouped_gemm`` finite and > 0."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    """Whether host-syncing debug checks run on the cute path (initially from CUTE_MOE_DEBUG)."""
    return _debug_checks


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _int(name: str, value, low: int, high: int, why: str) -> None:
    """``value`` must be an int in [low, high]; ``why`` explains the upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high} ({why}), got {value}")


def _dims(layout: str, shape: tuple) -> str:
    """'[T, H] = [4, ?]' for messages (None means any size)."""
    return f"{layout} = [{', '.join('?' if n is None else str(n) for n in shape)}]"


def _tensor(t, name: str, layout: str, shape: tuple, dtypes: tuple, device: torch.device | None,
            *, dtype_note: str = "") -> None:
    """``t`` must be a tensor of ``shape`` (None = any size) with a dtype in ``dtypes`` on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or cupy.ndarray, got {type(t).__name__}")
    got = t.shape
    if len(got) != len(shape):
        raise ValueError(f"{name}: expected a {len(shape)}-D tensor {layout}, got shape {list(got)}")
    for n, m in zip(shape, got):  # a plain loop: this runs for every tensor argument of every call
        if n is not None and n != m:
            raise ValueError(f"{name}: expected shape {_dims(layout, shape)}, got {list(got)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}{dtype_note}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the first input), got {t.device}")


def _optional(t, *args, **kwargs) -> None:
    if t is not None:
        _tensor(t, *args, **kwargs)


def _last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    """Kernels read rows; the last dimension must be dense."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride(-1) == 1), got strides "
                         f"{t.stride()}; pass {name}.contiguous()")


def check_x(x, name: str = "x") -> None:
    """``x`` [T, H]: bf16/fp16/fp32 with a contiguous last dimension."""
    _tensor(x, name, "[T, H]", (None, None), FLOAT_DTYPES, None)
    _last_dim_contiguous(x, name)


def check_route(router_logits, top_k, *, scoring, num_groups, topk_groups, correction_bias) -> None:
    """``router_logits`` [T, E] and the routing options."""
    _tensor(router_logits, "router_logits", "[T, E]", (None, None), FLOAT_DTYPES, None)
    check_routing(router_logits.shape[1], router_logits.device, top_k, scoring=scoring,
                  num_groups=num_groups, topk_groups=topk_groups, correction_bias=correction_bias)


def check_routing(num_experts: int, device: torch.device, top_k, *, scoring, num_groups, topk_groups,
                  correction_bias) -> None:
    """Routing options for E = ``num_experts`` experts."""
    check_choice("scoring", scoring, SCORINGS)
    _int("top_k", top_k, 1, num_experts, "the number of experts E")
    _optional(correction_bias, "correction_bias", "[E]", (num_experts,), FLOAT_DTYPES, device)
    if num_groups is None:
        if topk_groups is not None:
            raise ValueError(f"topk_groups: expected None when num_groups is None, got {topk_groups}")
        return
    _int("num_groups", num_groups, 1, num_experts, "the number of experts E")
    if num_experts % num_groups:
        raise ValueError(f"num_groups: expected a divisor of the number of experts E = {num_experts}, "
                         f"got {num_groups}")
    if topk_groups is None:
        raise ValueError("topk_groups: expected an int when num_groups is set, got None")
    _int("topk_groups", topk_groups, 1, num_groups, "num_groups")
    group_size = num_experts // num_groups
    if top_k > topk_groups * group_size:
        raise ValueError(f"top_k: expected <= topk_groups * E / num_groups = {topk_groups * group_size} "
                         f"experts left after group selection, got {top_k}")


def check_experts(x, w1, w2, *, activation, w1_bias, w2_bias, quant, shared_output, out) -> int:
    """Expert weights and per-token extras for ``x`` [T, H] (checked by :func:`check_x`); returns E."""
    device = x.device
    num_tokens, hidden = x.shape
    if quant is None:
        _tensor(w1, "w1", "[E, 2*I, H]", (None, None, hidden), (x.dtype,), device, dtype_note=" (same as x)")
        _last_dim_contiguous(w1, "w1")
        num_experts, inter = _expert_dims(w1, "w1")
        _tensor(w2, "w2", "[E, H, I]", (num_experts, hidden, inter), (x.dtype,), device,
                dtype_note=" (same as x)")
        _last_dim_contiguous(w2, "w2")
    else:
        num_experts, inter = _check_quant(quant, w1, w2, hidden, device)
    check_choice("activation", activation, ACTIVATIONS)
    _optional(w1_bias, "w1_bias", "[E, 2*I]", (num_experts, 2 * inter), FLOAT_DTYPES, device)
    _optional(w2_bias, "w2_bias", "[E, H]", (num_experts, hidden), FLOAT_DTYPES, device)
    _optional(shared_output, "shared_output", "[T, H]", (num_tokens, hidden), FLOAT_DTYPES, device)
    _optional(out, "out", "[T, H]", (num_tokens, hidden), (x.dtype,), device, dtype_note=" (same as x)")
    return num_experts


def check_topk(topk_weights, topk_ids, num_tokens: int, num_experts: int, device: torch.device) -> int:
    """Routing results ``topk_weights``/``topk_ids`` [T, top_k]; returns top_k."""
    _tensor(topk_ids, "topk_ids", "[T, top_k]", (num_tokens, None), ID_DTYPES, device)
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"topk_ids: expected 1 <= top_k <= E = {num_experts} columns, got {top_k}")
    _tensor(topk_weights, "topk_weights", "[T, top_k]", (num_tokens, top_k),
            (torch.float32, torch.bfloat16, torch.float16), device)
    return top_k


def check_weight_on_input(apply_router_weight_on_input: bool, top_k: int) -> None:
    """Scaling the expert input by the router weight is only defined for one expert per token."""
    if apply_router_weight_on_input and top_k != 1:
        raise ValueError(f"apply_router_weight_on_input: expected top_k == 1 (the weight scales the "
                         f"expert's input), got top_k = {top_k}")


def _expert_dims(w1: torch.Tensor, name: str) -> tuple[int, int]:
    """(E, I) from w1 [E, 2*I, H]; its dim 1 holds the gate and up halves."""
    num_experts, two_inter = w1.shape[:2]
    if two_inter % 2:
        raise ValueError(f"{name}: expected an even dim 1 (2*I: gate and up halves), got shape {list(w1.shape)}")
    return num_experts, two_inter // 2


def _weight_scale_shape(mode: str, w: torch.Tensor, gated: bool) -> tuple[int, int, int]:
    num_experts, n, k = w.shape
    if mode == "per_tensor":
        return num_experts, 1, 1
    if mode == "per_token":
        return num_experts, n, 1
    return num_experts, weight_scale_blocks(n, gated), -(-k // BLOCK)


def _check_quant(quant, w1, w2, hidden: int, device: torch.device) -> tuple[int, int]:
    """QuantizedWeights in place of w1/w2; returns (E, I)."""
    if not isinstance(quant, QuantizedWeights):
        raise TypeError(f"quant: expected a cute_moe.quant.QuantizedWeights or None, got {type(quant).__name__}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w is not None:
            raise ValueError(f"{name}: expected None when quant= is given (the weights come from quant), "
                             f"got {type(w).__name__}")
    check_choice("quant.mode", quant.mode, QUANT_MODES)
    _tensor(quant.w1_q, "quant.w1_q", "[E, 2*I, H]", (None, None, hidden), (FP8_DTYPE,), device)
    _last_dim_contiguous(quant.w1_q, "quant.w1_q")
    num_experts, inter = _expert_dims(quant.w1_q, "quant.w1_q")
    _tensor(quant.w2_q, "quant.w2_q", "[E, H, I]", (num_experts, hidden, inter), (FP8_DTYPE,), device)
    _last_dim_contiguous(quant.w2_q, "quant.w2_q")
    for name, q, scale in (("w1", quant.w1_q, quant.w1_scale), ("w2", quant.w2_q, quant.w2_scale)):
        shape = _weight_scale_shape(quant.mode, q, gated=name == "w1")
        _tensor(scale, f"quant.{name}_scale", f"({quant.mode} layout)", shape, (torch.float32,), device)
    quant.check_scales()
    return num_experts, inter


def check_router_weight(router_weight, num_experts: int, hidden: int, device: torch.device) -> None:
    """``router_weight`` [E, H] (bf16/fp16/fp32)."""
    _tensor(router_weight, "router_weight", "[E, H]", (num_experts, hidden), FLOAT_DTYPES, device)


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Every id must be in [0, E). Reads the values, so it syncs with the host."""
    if topk_ids.numel() and bool(((topk_ids < 0) | (topk_ids >= num_experts)).any()):
        raise ValueError(f"topk_ids: expected values in [0, E) = [0, {num_experts}), got min "
                         f"{int(topk_ids.min())}, max {int(topk_ids.max())}")
