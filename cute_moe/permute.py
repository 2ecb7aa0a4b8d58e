"""Permute tokens into expert-contiguous rows (optionally quantizing to fp8) and combine them back;
quantize rows to fp8 in place order (:func:`quantize_fp8`, GEMM2's input in the fp8 layer).

CuPy raw kernels (``kernels/permute.cu``, ``kernels/combine.cu``, ``kernels/quantize.cu``), one warp per
token (row), 16-byte
vector accesses (narrower only when a row or pointer is not 16-byte aligned), grid sized for the
chip. :func:`permute` reads each token row once and writes its k copies; padding rows of the
padded/masked layouts are zeroed. :func:`combine` sums each token's k rows in the fixed slot order
in float32 without atomics (bitwise reproducible). Neither syncs with the host; both launch on
torch's current stream and are CUDA-graph safe. Torch or cupy in, the caller's type out.

Rows of the output that hold no (token, slot) and are not padding are left untouched: flat rows
past ``cu_seqlens[E]`` (only with dropped ids), padded rows past ``padded_cu_seqlens[E]``, and masked
slots past ``masked_m[e]`` rounded up to ``pad_to``. GEMMs must not read them (the plan says where
the data ends: ``expert_of_block`` is -1 there).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _nvrtc
from ._nvrtc import DTYPE_CODES, check_rows
from .interop import array_kind, as_torch, to_kind
from .plan import LAYOUTS, RoutingPlan
from .quant import AMAX_EPS, FP8_MAX

FP8_DTYPE = torch.float8_e4m3fn
FP8_GROUP = 128
SCALINGS = ("token", "block")
QUANT_SCALINGS = ("token", "block", "tensor")
_MODE_TENSOR = 3  # per-tensor fp8 in permute.cu / quantize.cu
# launch settings from perf/sweep_permute.py (H200, GPT-OSS H=2880, T=8192 and 65536): unroll 6 and
# 32 CTAs per SM move 83-85% of copy bandwidth where 4 and 8 moved 80-81%
_WARPS = 8
_UNROLL = 6
_BLOCKS_PER_SM = 32
_AMAX_BLOCKS_PER_SM = 2  # each block of the amax reduction ends in one atomic on the same word
_fn_cache: dict[tuple, object] = {}


def _permute_defines(x_dt, mode, top_k, vb, pad):
    return tuple(sorted(dict(X_DT=x_dt, MODE=mode, TOP_K=top_k, VB=vb, PAD=pad, WARPS=_WARPS,
                             UNROLL=_UNROLL).items()))


def _combine_defines(y_dt, add_dt, top_k, has_w, vb):
    return tuple(sorted(dict(Y_DT=y_dt, ADD_DT=add_dt, TOP_K=top_k, HAS_W=int(has_w), VB=vb,
                             WARPS=_WARPS).items()))


def _quantize_defines(x_dt, mode):
    return tuple(sorted(dict(X_DT=x_dt, MODE=mode, WARPS=_WARPS).items()))


def compile_specializations() -> list[tuple[str, dict]]:
    """Representative define sets covering every branch of permute.cu, combine.cu and quantize.cu."""
    permutes = [(2, 0, 8, 16, 0), (2, 0, 8, 16, 1), (1, 0, 2, 16, 2), (0, 0, 4, 16, 0), (2, 0, 3, 2, 0),
                (0, 0, 1, 4, 1), (2, 1, 8, 16, 0), (0, 1, 4, 16, 1), (2, 2, 8, 16, 0), (1, 2, 2, 16, 2),
                (0, 2, 16, 16, 1), (2, 3, 8, 16, 0), (1, 3, 2, 16, 1), (0, 3, 4, 16, 2)]
    combines = [(2, -1, 8, True, 16), (2, 2, 8, True, 16), (1, 0, 2, False, 16), (0, 2, 4, True, 16),
                (2, 0, 1, True, 2), (0, 1, 16, False, 4), (2, 0, 32, True, 8)]
    quantizes = [(2, 1), (2, 2), (2, 3), (1, 1), (1, 2), (0, 3)]
    return ([("permute.cu", dict(_permute_defines(*c))) for c in permutes]
            + [("combine.cu", dict(_combine_defines(*c))) for c in combines]
            + [("quantize.cu", dict(_quantize_defines(*c))) for c in quantizes])


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _vector_bytes(*byte_counts: int) -> int:
    """Largest of 16/8/4/2 dividing every byte count (row sizes, strides, addresses)."""
    for vb in (16, 8, 4, 2):
        if all(b % vb == 0 for b in byte_counts):
            return vb
    return 1


def _get(source: str, kernel: str, dev: int, defines: tuple):
    """Kernel ``kernel`` of ``source`` compiled with ``defines`` on device ``dev`` (cached per process)."""
    key = (dev, source, kernel, defines)
    fn = _fn_cache.get(key)
    if fn is None:
        fn = _nvrtc.get_function(dev, source, kernel, defines)
        _fn_cache[key] = fn
    return fn


def _grid(dev: int, items: int) -> int:
    return max(1, min(-(-items // _WARPS), _nvrtc.device_info(dev)[1] * _BLOCKS_PER_SM))


def _segments(dev: int, rows: int, vectors: int, step: int) -> int:
    """Segments per row (one warp each, ``step`` vectors at a time) so that ``rows`` rows of
    ``vectors`` vectors fill the largest grid: many for decode, 1 once there are enough rows."""
    warps = _nvrtc.device_info(dev)[1] * _BLOCKS_PER_SM * _WARPS
    return max(1, min(-(-warps // max(rows, 1)), -(-vectors // step)))


def _check_plan_type(plan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan: expected a RoutingPlan (cute_moe.plan.make_plan), got {type(plan).__name__}")


def _check_plan(plan, layout: str, device: torch.device) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    plan.rows(layout)  # raises if the plan lacks this layout
    if plan.device != device:
        raise ValueError(f"plan: expected tensors on {device}, got {plan.device}")
    if plan.top_k > 32:
        raise ValueError(f"plan: top_k <= 32 supported, got {plan.top_k}")


def _check_x(x: torch.Tensor, plan: RoutingPlan, name: str = "x") -> int:
    _check_plan_type(plan)
    code = check_rows(x, name, "[T, H]")
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"{name}: expected {plan.num_tokens} rows (the plan's T), got {x.shape[0]}")
    return code


def _out_shape(plan: RoutingPlan, layout: str, hidden: int) -> tuple[int, ...]:
    if layout == "masked":
        return (plan.num_experts, plan.max_m, hidden)
    return (plan.rows(layout), hidden)


def _check_out(out, shape, dtypes, device, name="out") -> torch.Tensor:
    t = as_torch(out, name)
    if tuple(t.shape) != tuple(shape) and not (len(shape) == 3 and tuple(t.shape) == (shape[0] * shape[1], shape[2])):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t


def _pad_args(plan: RoutingPlan, layout: str, pad_to: int | None):
    """(PAD code, pad items, rows per expert item, base ptr, count ptr, max_m, pad multiple)."""
    if layout == "padded" and plan.block_m > 1:
        per = plan.block_m - 1
        return 1, plan.num_experts * per, per, plan.padded_cu_seqlens.data_ptr(), plan.counts.data_ptr(), 0, 1
    if layout == "masked":
        pad_to = plan.block_m if pad_to is None else pad_to
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
            raise ValueError(f"pad_to: expected a positive int or None, got {pad_to!r}")
        if pad_to is not None and pad_to > 1:
            per = min(pad_to, plan.max_m) - 1
            return 2, plan.num_experts * per, per, 0, plan.masked_m.data_ptr(), plan.max_m, pad_to
    return 0, 0, 1, 0, 0, 0, 1


def permute(x, plan: RoutingPlan, *, layout: str = "flat", out=None, pad_to: int | None = None):
    """Rows of ``x`` [T, H] in ``layout``'s expert-contiguous order: out[r] = x[row_src[r] // k].

    Returns [T*k, H] (flat), [plan.padded_rows, H] (padded) or [E, max_m, H] (masked) in x's dtype;
    padding rows are zero. ``pad_to`` (masked only, default ``plan.block_m``): zero each expert's
    empty slots up to the next multiple of it.
    """
    kind = array_kind(x)
    xt = as_torch(x, "x")
    x_dt = _check_x(xt, plan)
    _check_plan(plan, layout, xt.device)
    hidden, es = xt.shape[1], xt.element_size()
    shape = _out_shape(plan, layout, hidden)
    o = (torch.empty(shape, dtype=xt.dtype, device=xt.device) if out is None
         else _check_out(out, shape, (xt.dtype,), xt.device))
    vb = _vector_bytes(hidden * es, xt.stride(0) * es, xt.data_ptr(), o.data_ptr())
    if vb < es:
        raise ValueError(f"x: rows must be aligned to the element size ({es} bytes)")
    _launch_permute(xt, plan, layout, o, None, 0, x_dt, 0, vb, pad_to)
    return to_kind(o, kind) if out is None else out


def permute_fp8(x, plan: RoutingPlan, *, layout: str = "flat", scaling: str = "block", out=None,
                out_scale=None, pad_to: int | None = None):
    """Like :func:`permute`, quantizing to fp8 e4m3 on the way (cute_moe.quant semantics).

    ``scaling="token"``: one scale per row, ``scale`` [rows] ([E, max_m] masked);
    ``scaling="block"``: one scale per 1x128 group, group-major ``scale`` [ceil(H/128), rows]
    ([E, ceil(H/128), max_m] masked). Returns (q, scale) with q float8_e4m3fn (uint8 for cupy callers,
    which have no fp8 dtype). H must be a multiple of 16 and x's rows 16-byte aligned.
    """
    kind = array_kind(x)
    xt = as_torch(x, "x")
    x_dt = _check_x(xt, plan)
    _check_plan(plan, layout, xt.device)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")
    hidden = xt.shape[1]
    _check_fp8_rows(xt, "fp8 permute")
    shape = _out_shape(plan, layout, hidden)
    rows = plan.rows(layout)
    groups = -(-hidden // FP8_GROUP)
    if layout == "masked":
        sshape = (plan.num_experts, plan.max_m) if scaling == "token" else (plan.num_experts, groups, plan.max_m)
    else:
        sshape = (rows,) if scaling == "token" else (groups, rows)
    q = (torch.empty(shape, dtype=FP8_DTYPE, device=xt.device) if out is None
         else _check_out(out, shape, (FP8_DTYPE, torch.uint8), xt.device))
    s = (torch.empty(sshape, dtype=torch.float32, device=xt.device) if out_scale is None
         else _check_out(out_scale, sshape, (torch.float32,), xt.device, "out_scale"))
    if q.data_ptr() % 16:
        raise ValueError("out: must be 16-byte aligned")
    slab_rows = plan.max_m if layout == "masked" else max(rows, 1)
    _launch_permute(xt, plan, layout, q, s, slab_rows, x_dt, 1 + SCALINGS.index(scaling), 16, pad_to)
    if out is not None:
        return out, out_scale if out_scale is not None else to_kind(s, kind)
    if kind == "cupy":
        q = q.view(torch.uint8)
    return to_kind(q, kind), to_kind(s, kind)


def permute_fp8_per_tensor(x, plan: RoutingPlan, *, layout: str = "flat", out=None, out_scale=None,
                           pad_to: int | None = None):
    """Like :func:`permute_fp8` with one dynamic scale for all of ``x``: ``max(amax|x|, 1e-10) / 448``
    as :func:`cute_moe.quant.quantize_per_tensor`. Two launches (an amax reduction over x, then the
    permute), no host sync. ``out_scale``: optional float32 [2] scratch ([amax, scale]; zeroed here).
    Returns (q, scale float32 [1])."""
    kind = array_kind(x)
    xt = as_torch(x, "x")
    x_dt = _check_x(xt, plan)
    _check_plan(plan, layout, xt.device)
    _check_fp8_rows(xt, "fp8 permute")
    shape = _out_shape(plan, layout, xt.shape[1])
    q = (torch.empty(shape, dtype=FP8_DTYPE, device=xt.device) if out is None
         else _check_out(out, shape, (FP8_DTYPE, torch.uint8), xt.device))
    if q.data_ptr() % 16:
        raise ValueError("out: must be 16-byte aligned")
    ws = _amax_scratch(out_scale, xt.device)
    _launch_amax(xt, x_dt, None, ws)
    if not _launch_permute(xt, plan, layout, q, ws, 1, x_dt, _MODE_TENSOR, 16, pad_to):
        ws[1:].fill_(AMAX_EPS / FP8_MAX)
    if out is None and kind == "cupy":
        q = q.view(torch.uint8)
    return (to_kind(q, kind) if out is None else out), to_kind(ws[1:], kind)


def _amax_scratch(out_scale, device) -> torch.Tensor:
    """float32 [2] = [amax, scale] of the per-tensor kernels, zeroed: ``out_scale`` or a new tensor."""
    if out_scale is None:
        return torch.zeros(2, dtype=torch.float32, device=device)
    return _check_out(out_scale, (2,), (torch.float32,), device, "out_scale").zero_()


def quantize_fp8(x, *, scaling: str = "token", num_rows=None, out=None, out_scale=None):
    """Rows of ``x`` [M, K] (bf16/fp16/fp32) quantized to fp8 e4m3, row r to row r (cute_moe.quant
    semantics), e.g. GEMM1's activated output before GEMM2.

    ``scaling``: ``"token"`` one scale per row, scale [M]; ``"block"`` one per 1x128 group, group-major
    scale [ceil(K/128), M] (the grouped GEMM's layout); ``"tensor"`` one dynamic scale for all rows,
    scale [1] (an amax reduction, then the quantization: two launches). ``num_rows``: optional int32
    tensor on x's device whose first element n limits the work to rows < min(M, n) (e.g.
    ``plan.cu_seqlens[E:]``); later rows of q and scale are not written and not in the per-tensor amax.
    n is read on the device: no host sync, CUDA-graph safe. K must be a multiple of 16 and rows
    16-byte aligned. ``out`` [M, K] fp8 and ``out_scale`` (the scale's shape; for ``"tensor"`` a [2]
    scratch holding [amax, scale]) are optional destinations. Returns (q float8_e4m3fn, uint8 for cupy
    callers; scale float32).
    """
    kind = array_kind(x)
    xt = as_torch(x, "x")
    if scaling not in QUANT_SCALINGS:
        raise ValueError(f"scaling: expected one of {QUANT_SCALINGS}, got {scaling!r}")
    x_dt = check_rows(xt, "x", "[M, K]")
    _check_fp8_rows(xt, "fp8 quantization", "K")
    count = as_torch(num_rows, "num_rows")
    if count is not None and (count.dtype != torch.int32 or count.numel() < 1 or count.device != xt.device):
        raise ValueError(f"num_rows: expected an int32 tensor with at least one element on {xt.device}, got "
                         f"{count.dtype} {tuple(count.shape)} on {count.device}")
    rows, cols = xt.shape
    q = (torch.empty((rows, cols), dtype=FP8_DTYPE, device=xt.device) if out is None
         else _check_out(out, (rows, cols), (FP8_DTYPE,), xt.device))
    if q.data_ptr() % 16:
        raise ValueError("out: must be 16-byte aligned")
    if scaling == "tensor":
        scale = _amax_scratch(out_scale, xt.device)
        _launch_amax(xt, x_dt, count, scale)
    else:
        sshape = (rows,) if scaling == "token" else (-(-cols // FP8_GROUP), rows)
        scale = (torch.empty(sshape, dtype=torch.float32, device=xt.device) if out_scale is None
                 else _check_out(out_scale, sshape, (torch.float32,), xt.device, "out_scale"))
    if rows:
        dev = _device_index(xt)
        mode = 1 + QUANT_SCALINGS.index(scaling)
        fn = _get("quantize.cu", "quantize_rows", dev, _quantize_defines(x_dt, mode))
        args = (xt.data_ptr(), xt.stride(0) * xt.element_size(), np.int32(rows), np.int32(cols),
                0 if count is None else count.data_ptr(), q.data_ptr(), scale.data_ptr())
        _nvrtc.launch(fn, dev, _grid(dev, rows), _WARPS * 32, args)
    elif scaling == "tensor":
        scale[1:].fill_(AMAX_EPS / FP8_MAX)
    if scaling == "tensor":
        scale = scale[1:]
    if kind == "cupy":
        q = q.view(torch.uint8)
    return to_kind(q, kind), to_kind(scale, kind)


def _check_fp8_rows(xt: torch.Tensor, what: str, cols: str = "H") -> None:
    """fp8 kernels read 16-element chunks with 16-byte loads."""
    es = xt.element_size()
    if xt.shape[1] % 16:
        raise ValueError(f"x: {what} needs {cols} % 16 == 0, got {cols} = {xt.shape[1]}")
    if (xt.stride(0) * es) % 16 or xt.data_ptr() % 16:
        raise ValueError(f"x: {what} needs 16-byte aligned rows (data pointer and row stride)")


def _launch_amax(xt, x_dt, count, ws) -> None:
    """ws[0] = max(ws[0], amax of x's rows (< count[0] when given)) on the device."""
    rows = xt.shape[0]
    if rows == 0:
        return
    dev = _device_index(xt)
    fn = _get("quantize.cu", "amax_rows", dev, _quantize_defines(x_dt, _MODE_TENSOR))
    grid = max(1, min(-(-rows // _WARPS), _nvrtc.device_info(dev)[1] * _AMAX_BLOCKS_PER_SM))
    args = (xt.data_ptr(), xt.stride(0) * xt.element_size(), np.int32(rows), np.int32(xt.shape[1]),
            0 if count is None else count.data_ptr(), ws.data_ptr())
    _nvrtc.launch(fn, dev, grid, _WARPS * 32, args)


def _launch_permute(xt, plan, layout, out, scale, slab_rows, x_dt, mode, vb, pad_to) -> bool:
    """Launch permute.cu's permute_rows; False when there was nothing to do (no launch)."""
    pad, pad_items, per, base_ptr, count_ptr, max_m, pad_multiple = _pad_args(plan, layout, pad_to)
    items = plan.num_tokens + pad_items
    if items == 0:
        return False
    dev = _device_index(xt)
    fn = _get("permute.cu", "permute_rows", dev, _permute_defines(x_dt, mode, plan.top_k, vb, pad))
    i32 = np.int32
    segs = 1 if mode else _segments(dev, plan.num_tokens, xt.shape[1] * xt.element_size() // vb, 32 * _UNROLL)
    args = (xt.data_ptr(), xt.stride(0) * xt.element_size(), i32(plan.num_tokens), i32(xt.shape[1]),
            plan.dest_rows(layout).data_ptr(), out.data_ptr(), 0 if scale is None else scale.data_ptr(),
            i32(slab_rows), i32(pad_items), i32(per), base_ptr, count_ptr, i32(max_m), i32(pad_multiple), i32(segs))
    _nvrtc.launch(fn, dev, _grid(dev, plan.num_tokens * segs + pad_items), _WARPS * 32, args)
    return True


def combine(y, plan: RoutingPlan, topk_weights=None, *, layout: str = "flat", addend=None, out=None):
    """out[t] = sum_{j<k} topk_weights[t, j] * y[token_rows[t, j]] (+ addend[t]) -> [T, H] in y's dtype.

    ``y`` holds the rows of ``layout``'s row space ([T*k, H], [plan.padded_rows, H], or [E, max_m, H] /
    [E*max_m, H] masked), e.g. the GEMM2 output. ``topk_weights`` [T, k] float32 (None: weight 1);
    ``addend`` [T, H] any float dtype (e.g. the shared-expert output). Float32 accumulation in slot
    order, no atomics: bitwise reproducible. Dropped slots (row -1) contribute nothing.
    """
    kind = array_kind(y)
    yt = as_torch(y, "y")
    _check_plan_type(plan)
    if yt.device.type != "cuda":
        raise ValueError(f"y: expected a CUDA tensor, got device {yt.device}")
    _check_plan(plan, layout, yt.device)
    y_dt = DTYPE_CODES.get(yt.dtype)
    if y_dt is None:
        raise TypeError(f"y: expected bf16, fp16 or fp32, got {yt.dtype}")
    rows = plan.rows(layout)
    if yt.dim() == 3 and layout == "masked" and tuple(yt.shape[:2]) == (plan.num_experts, plan.max_m):
        yt = yt.reshape(rows, yt.shape[2]) if yt.is_contiguous() else yt
    if yt.dim() != 2 or yt.shape[0] != rows:
        raise ValueError(f"y: expected [{rows}, H] for the {layout!r} layout, got shape {tuple(yt.shape)}")
    if not yt.is_contiguous():
        raise ValueError(f"y: expected a contiguous tensor, got strides {yt.stride()}")
    T, hidden, es = plan.num_tokens, yt.shape[1], yt.element_size()
    w = as_torch(topk_weights, "topk_weights")
    if w is not None:
        if w.dtype != torch.float32 or tuple(w.shape) != (T, plan.top_k) or not w.is_contiguous():
            raise ValueError(f"topk_weights: expected a contiguous float32 [{T}, {plan.top_k}] tensor, got "
                             f"{w.dtype} {tuple(w.shape)} strides {w.stride()}")
        if w.device != yt.device:
            raise ValueError(f"topk_weights: expected device {yt.device}, got {w.device}")
    a = as_torch(addend, "addend")
    add_dt, add_stride, add_ptr = -1, 0, 0
    if a is not None:
        add_dt = DTYPE_CODES.get(a.dtype, -1)
        if add_dt < 0:
            raise TypeError(f"addend: expected bf16, fp16 or fp32, got {a.dtype}")
        if tuple(a.shape) != (T, hidden) or (hidden > 1 and a.stride(1) != 1) or a.device != yt.device:
            raise ValueError(f"addend: expected [{T}, {hidden}] with a contiguous last dimension on {yt.device}, "
                             f"got {tuple(a.shape)} strides {a.stride()} on {a.device}")
        add_stride, add_ptr = a.stride(0) * a.element_size(), a.data_ptr()
    o = (torch.empty((T, hidden), dtype=yt.dtype, device=yt.device) if out is None
         else _check_out(out, (T, hidden), (yt.dtype,), yt.device))
    vb = _vector_bytes(hidden * es, yt.data_ptr(), o.data_ptr())
    if vb < es:
        raise ValueError(f"y: rows must be aligned to the element size ({es} bytes)")
    if a is not None:
        need = min(16, (vb // es) * a.element_size())
        if add_ptr % need or add_stride % need:
            raise ValueError(f"addend: rows must be {need}-byte aligned (pointer and row stride)")
    if T:
        dev = _device_index(yt)
        fn = _get("combine.cu", "combine_rows", dev, _combine_defines(y_dt, add_dt, plan.top_k, w is not None, vb))
        i32 = np.int32
        segs = _segments(dev, T, hidden * es // vb, 32)
        args = (yt.data_ptr(), plan.dest_rows(layout).data_ptr(), 0 if w is None else w.data_ptr(), add_ptr,
                add_stride, o.data_ptr(), hidden * es, i32(T), i32(hidden), i32(segs))
        _nvrtc.launch(fn, dev, _grid(dev, T * segs), _WARPS * 32, args)
    return to_kind(o, kind) if out is None else out
