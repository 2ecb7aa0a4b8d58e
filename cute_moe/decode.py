"""The MoE layer (or its expert stage) for a few tokens in one kernel (``kernels/moe_decode.cu``): the decode path.

At decode sizes (a handful of tokens) the MoE layer streams each active expert's weights once and
does a few FLOPs per weight, so the staged pipeline (plan, permute, GEMM1, GEMM2, combine: five
launches, each GEMM with a fixed start-up cost) spends as much time starting kernels as reading
weights. :func:`fused_moe_decode` runs GEMM1 + activation, GEMM2, the router-weighted combine and the
shared-output add in one cooperative launch with a grid barrier between the GEMMs (weights
streamed by bulk copies into per-warp shared-memory rings, dot products on CUDA cores,
bitwise-reproducible float32 sums). With ROUTE (:func:`moe_launch` / :func:`run_moe`) the same launch
also computes the router logits and the top-k routing (a second grid barrier), so ``moe`` at decode
sizes is one kernel.
``cute_moe.layer`` takes it automatically for ``T <= MAX_TOKENS`` bf16/fp16 calls it can run;
``MAX_TOKENS = 0`` (or the environment variable ``CUTE_MOE_DECODE_MAX_TOKENS=0``) turns it off.
:func:`experts_launch` / :func:`moe_launch` return a call shape's launch data (a pure function of
shapes, dtypes and options), which the API memoizes per call signature and hands to
:func:`run_experts` / :func:`run_moe`.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from . import _nvrtc, routing
from ._nvrtc import DTYPE_CODES


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of moe_decode.cu: warps per CTA (one CTA per SM), bytes of a weight row per bulk
    copy (GEMM1 copies a chunk of the gate and of the up row per step, GEMM2 twice a chunk of one w2
    row), and steps in flight per warp. Shared memory holds warps * stages * 2 * chunk bytes of
    weight stages besides the x / activation rows."""

    warps: int = 16
    chunk: int = 1024
    stages: int = 4

    def ring_bytes(self) -> int:
        return self.warps * self.stages * 2 * self.chunk

    def static_smem_bytes(self) -> int:
        """Upper bound of the kernel's static shared memory (bookkeeping, mbarriers)."""
        return 4096


# Up to this many tokens the layer runs the one-kernel decode path: at T = 1 and 2 it beat the staged
# pipeline on every reference shape (perf/sm90/bench_decode_layer.py, H100); at T = 4 it was 3-6%
# faster for Qwen3 / GPT-OSS on an H100 but 6-21% slower on an H200 (16 warps), and Mixtral's and
# DeepSeek-V3's rows no longer fit shared memory. The kernel takes up to 8.
MAX_TOKENS = int(os.environ.get("CUTE_MOE_DECODE_MAX_TOKENS", "2"))
# moe's router and routing inside the decode kernel where route_key allows (False: the routing kernels,
# then the experts kernel; for A/B benchmarks; environment variable CUTE_MOE_DECODE_ROUTE=0)
ROUTE_IN_KERNEL = os.environ.get("CUTE_MOE_DECODE_ROUTE", "1") != "0"
# None: pick_config per shape; a DecodeConfig forces that launch shape (benchmarks, tests)
CONFIG: DecodeConfig | None = None
# warps per CTA pick_config chooses from (the first of equally good ones wins)
WARP_CHOICES = (16, 12, 14, 18, 20, 22, 24)

_SOURCE = "moe_decode.cu"
_KERNEL = "moe_decode"
_TMAX = (1, 2, 4, 8)
_MAX_ENTRIES = 64  # TMAX * top_k bound of the kernel's shared bookkeeping
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swiglu_oai": 2}
_MAX_DYNAMIC_SMEM_ATTR = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_device_limits: dict[int, tuple[int, int]] = {}  # device -> (opt-in shared memory per block, major)
_set_attribute = None


def _defines(x_dt: int, tw_dt: int, sh_dt: int, b1_dt: int | None, b2_dt: int | None, ids_i64: bool, top_k: int,
             tmax: int, act: int, config: DecodeConfig = DecodeConfig(), route: tuple | None = None) -> tuple:
    """moe_decode.cu's defines; a None dtype code (bias) or sh_dt < 0 (shared_output) means absent.
    ``route``: (E, router weight dtype code, scoring, bias dtype code or None, groups, topk groups,
    renormalize) when the kernel routes (ROUTE), else None."""
    d = dict(X_DT=x_dt, TW_DT=tw_dt, SH_DT=max(sh_dt, 0), HAS_SHARED=int(sh_dt >= 0), B1_DT=b1_dt or 0,
             HAS_B1=int(b1_dt is not None), B2_DT=b2_dt or 0, HAS_B2=int(b2_dt is not None), IDS_I64=int(ids_i64),
             TOP_K=top_k, TMAX=tmax, ACT=act, NW=config.warps, CHUNK=config.chunk, STAGES=config.stages,
             ROUTE=int(route is not None))
    if route is not None:
        num_experts, rw_dt, scoring, bias_dt, groups, topk_groups, renorm = route
        d |= dict(routing.defines(num_experts, top_k, DTYPE_CODES[torch.float32], scoring, bias_dt, groups,
                                  topk_groups, renorm, warps=config.warps), RW_DT=rw_dt)
    return tuple(sorted(d.items()))


def compile_specializations() -> list[tuple[str, dict]]:
    """Define sets covering every branch of moe_decode.cu (for the CPU compile check)."""
    cases = [(2, 0, -1, None, None, False, 8, 1, 0), (2, 0, 0, 2, 0, True, 2, 8, 1),
             (1, 1, 1, 1, 1, False, 4, 4, 2), (2, 2, -1, None, 2, True, 1, 2, 2), (2, 0, 2, 0, None, False, 8, 8, 0)]
    configs = [DecodeConfig(), DecodeConfig(24, 1024, 3), DecodeConfig(32, 512, 4), DecodeConfig(),
               DecodeConfig(8, 2048, 4)]
    routed = [  # (case, config, route): DeepSeek-V3, Mixtral, fp32 router weight, groups of 64 and an fp16 one
        ((2, 0, -1, None, None, False, 8, 2, 0), DecodeConfig(14), (256, 2, "sigmoid", 0, 8, 4, True)),
        ((2, 0, -1, None, None, False, 2, 1, 0), DecodeConfig(), (8, 2, "softmax", None, 0, 0, True)),
        ((1, 0, 1, 1, None, False, 4, 8, 2), DecodeConfig(20), (128, 0, "softmax", None, 0, 0, False)),
        ((2, 0, -1, None, None, False, 6, 2, 1), DecodeConfig(), (128, 1, "sigmoid", 2, 2, 1, False)),
    ]
    return ([(_SOURCE, dict(_defines(*c, config=cfg))) for c, cfg in zip(cases, configs)]
            + [(_SOURCE, dict(_defines(*c, config=cfg, route=r))) for c, cfg, r in routed])


def _imbalance(units: int, workers: int) -> float:
    """Slowest worker's share over the mean share when ``units`` equal units go round-robin to
    ``workers`` (1 when there are fewer units than workers: the idle ones cost nothing)."""
    per = units / workers
    return math.ceil(per) / per if per > 1 else 1.0


@lru_cache(maxsize=256)
def pick_config(num_sms: int, active: int, hidden: int, inter: int, max_ring: int,
                max_warps: int = 32) -> DecodeConfig | None:
    """The launch shape for ``active`` experts of an (H, I) layer on ``num_sms`` SMs with ``max_ring``
    bytes of shared memory for the weight rings (None if none fits). Each warp streams whole units
    (GEMM1: a gate/up row pair, GEMM2: one output column over the active experts), so a warp with one
    unit more than the mean finishes late; pick the warp count whose rounding costs the fewest bytes
    (GPT-OSS-120B: 22 warps give every warp one GEMM2 column, where 16 give 1.36 on average and 2 at
    most). Ties keep 16, measured best for Qwen3-30B-A3B. At most ``max_warps`` warps (registers)."""
    best = None
    for warps in WARP_CHOICES:
        cfg = DecodeConfig(warps=warps)
        if cfg.ring_bytes() > max_ring or warps > max_warps:
            continue
        workers = num_sms * warps
        cost = 2 * _imbalance(active * inter, workers) + _imbalance(hidden, workers)
        if best is None or cost < best[0] - 1e-6:
            best = (cost, cfg)
    return None if best is None else best[1]


def _config(dev: int, num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, elem: int):
    if CONFIG is not None:
        return CONFIG
    rows = max(num_tokens * hidden, num_tokens * top_k * inter) * elem
    return pick_config(_nvrtc.device_info(dev)[1], min(num_tokens * top_k, num_experts), hidden, inter,
                       _limits(dev)[0] - DecodeConfig().static_smem_bytes() - rows, max_warps(_tmax(num_tokens)))


def max_warps(tmax: int) -> int:
    """Most warps per CTA whose register budget holds the kernel for ``tmax`` tokens without spills
    (cross-compiled for sm_90: up to 4 tokens 80-87 registers, 8 tokens 96-106, which spill at 22+
    warps; tests/test_decode_cpu.py checks the SASS)."""
    return 20 if tmax > 4 else 32


def _tmax(num_tokens: int) -> int:
    return next(t for t in _TMAX if t >= num_tokens)


def _limits(dev: int) -> tuple[int, int]:
    """(opt-in shared memory per block, compute capability major) of device ``dev`` (cached)."""
    lim = _device_limits.get(dev)
    if lim is None:
        props = torch.cuda.get_device_properties(dev)
        lim = _device_limits[dev] = (int(getattr(props, "shared_memory_per_block_optin", 48 * 1024)), props.major)
    return lim


def smem_bytes(num_tokens: int, top_k: int, hidden: int, inter: int, elem: int, config: DecodeConfig) -> int:
    """Dynamic shared memory of a call: the weight rings, then x's rows, later the activations' rows."""
    return config.ring_bytes() + max(num_tokens * hidden, num_tokens * top_k * inter) * elem


def _dt(t) -> int | None:
    return None if t is None else DTYPE_CODES[t.dtype]


def precompile(device_index: int, dtype: torch.dtype, top_k: int, num_experts: int, hidden: int, inter: int,
               activation: str, *, w1_bias: torch.dtype | None = None, w2_bias: torch.dtype | None = None,
               shared_output: torch.dtype | None = None, route: tuple | None = None) -> int:
    """Compile and load the decode kernels a layer's calls of 1..MAX_TOKENS tokens will launch (float32
    router weights, int32 ids, the given optional dtypes; with ``route``, :func:`route_key`'s tuple,
    the kernels that also route), without launching them (cute_moe.warmup). Returns how many token
    counts the decode path takes for this layer."""
    codes = (DTYPE_CODES[dtype], DTYPE_CODES[torch.float32], *(None if d is None else DTYPE_CODES[d]
                                                              for d in (shared_output, w1_bias, w2_bias)), False)
    elem, taken = torch.empty((), dtype=dtype).element_size(), 0
    for num_tokens in range(1, min(MAX_TOKENS, _TMAX[-1]) + 1):
        if _shape_reason(device_index, num_tokens, top_k, num_experts, hidden, inter, elem, CONFIG) is None:
            _launch(device_index, codes, num_tokens, top_k, num_experts, hidden, inter, elem,
                    ACTIVATION_CODES[activation], CONFIG, route)
            taken += 1
    return taken


def unsupported_reason(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, top_k: int, *, topk_ids=None, w1_bias=None,
                       w2_bias=None, shared_output=None, out=None) -> str | None:
    """Why the decode kernel cannot take this (validated, bf16/fp16, contiguous x/w1/w2) call, or None."""
    num_tokens = x.shape[0]
    if not 0 < num_tokens <= min(MAX_TOKENS, _TMAX[-1]):
        return f"T = {num_tokens} is outside the decode path's 1..{min(MAX_TOKENS, _TMAX[-1])} tokens"
    reason = _shape_reason(x.device.index, num_tokens, top_k, w1.shape[0], x.shape[1], w1.shape[1] // 2,
                           x.element_size(), CONFIG)
    if reason is not None:
        return reason
    if x.data_ptr() % 16 or w1.data_ptr() % 16 or w2.data_ptr() % 16:
        return "x, w1 and w2 must be 16-byte aligned"
    for name, t in (("shared_output", shared_output), ("out", out), ("topk_ids", topk_ids), ("w1_bias", w1_bias),
                    ("w2_bias", w2_bias)):
        if t is not None and not t.is_contiguous():
            return f"{name} is not contiguous"
    return None


def route_key(router_weight: torch.Tensor, top_k: int, scoring: str, renormalize: bool, num_groups, topk_groups,
              correction_bias) -> tuple | str:
    """The routing part of the kernel's specialization when the decode kernel can route these
    (validated) arguments itself (see :func:`route_spec`); else why not (a str: the layer then routes
    with its own kernels)."""
    if not ROUTE_IN_KERNEL:
        return "routing inside the decode kernel is off (decode.ROUTE_IN_KERNEL)"
    if not router_weight.is_contiguous() or router_weight.data_ptr() % 16:
        return "router_weight must be contiguous and 16-byte aligned"
    if correction_bias is not None and not correction_bias.is_contiguous():
        return "correction_bias must be contiguous"
    return route_spec(router_weight.shape[0], router_weight.dtype, top_k, scoring, renormalize, num_groups,
                      topk_groups, None if correction_bias is None else correction_bias.dtype)


def route_spec(num_experts: int, router_dtype: torch.dtype, top_k: int, scoring: str, renormalize: bool, num_groups,
               topk_groups, bias_dtype: torch.dtype | None) -> tuple | str:
    """(E, router weight dtype code, scoring, bias dtype code, groups, topk groups, renormalize): the
    routing part of the kernel's specialization, or why the kernel does not route this configuration."""
    if num_experts > routing.MAX_EXPERTS or top_k > routing.MAX_TOP_K:  # E <= 1024: T*E logits fit the rings
        return f"E = {num_experts} / top_k = {top_k} exceed the routing kernel's limits"
    if num_groups and (num_experts // num_groups) % 32:
        return "groups of a number of experts that is not a multiple of 32 route in their own kernel"
    return (num_experts, DTYPE_CODES[router_dtype], scoring, None if bias_dtype is None else DTYPE_CODES[bias_dtype],
            num_groups or 0, topk_groups or 0, bool(renormalize))


@lru_cache(maxsize=1024)
def _shape_reason(dev: int, num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, elem: int,
                  config: DecodeConfig | None) -> str | None:
    """The shape-only part of :func:`unsupported_reason` (cached: it runs on every small-T call)."""
    if _tmax(num_tokens) * top_k > _MAX_ENTRIES:
        return f"T * top_k = {num_tokens} * {top_k} rounds past {_MAX_ENTRIES} entries"
    if _limits(dev)[1] < 9:
        return "the decode kernel needs sm_90 or newer (bulk copies, mbarrier transaction counts)"
    cfg = _config(dev, num_tokens, top_k, num_experts, hidden, inter, elem)
    if cfg is None or smem_bytes(num_tokens, top_k, hidden, inter, elem, cfg) > _max_dynamic_smem(dev, cfg):
        return "the weight rings and x's or the activations' rows do not fit in shared memory"
    return None


def _max_dynamic_smem(dev: int, config: DecodeConfig) -> int:
    return _limits(dev)[0] - config.static_smem_bytes()


def _function(dev: int, defines: tuple, config: DecodeConfig):
    """The compiled kernel for ``defines`` on ``dev`` (cached by _nvrtc), allowed the device's opt-in
    shared memory (called once per :func:`_launch` entry)."""
    global _set_attribute
    fn = _nvrtc.get_function(dev, _SOURCE, _KERNEL, defines)
    if _set_attribute is None:
        _set_attribute = _nvrtc.driver_function("cuFuncSetAttribute", [ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    if _set_attribute is not None:
        _set_attribute(fn.ptr, _MAX_DYNAMIC_SMEM_ATTR, _max_dynamic_smem(dev, config))
    return fn


def logit_slices(num_warps: int, num_experts: int, hidden: int) -> int:
    """Slices of H the routing kernel splits each router weight row into (moe_decode.cu's route_tokens)."""
    return max(1, min(num_warps // num_experts, -(-hidden // 256)))


class _Launch(NamedTuple):
    """A call shape's kernel and launch data (see :func:`_launch`)."""

    launch: _nvrtc.CooperativeLaunch  # the kernel's launch (grid, block, shared memory, parameter layout)
    sizes: tuple        # trailing int32 arguments: T, H, I, E
    scratch: int        # bytes of scratch: h [T*k, I], then (routing) the float32 partial logits
    parts_at: int       # byte offset of the partial logits in the scratch
    extra_rows: int     # rows of H elements after out's [T, H] that hold the scratch (one allocation)


@lru_cache(maxsize=1024)
def _launch(dev: int, dtypes: tuple, num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
            elem: int, act: int, config: DecodeConfig | None, route: tuple | None = None) -> _Launch:
    """The kernel and launch data of a call shape (cached: host time per decode call is part of the
    layer's latency). ``route``: :func:`route_key`'s tuple for the kernel that also routes."""
    cfg = _config(dev, num_tokens, top_k, num_experts, hidden, inter, elem)
    x_dt, tw_dt, sh_dt, b1_dt, b2_dt, ids_i64 = dtypes
    defines = _defines(x_dt, tw_dt, -1 if sh_dt is None else sh_dt, b1_dt, b2_dt, ids_i64, top_k, _tmax(num_tokens),
                       act, cfg, route)
    grid = _nvrtc.device_info(dev)[1]
    parts_at = -(-num_tokens * top_k * inter * elem // 16) * 16
    scratch = parts_at
    if route is not None:
        scratch += num_tokens * num_experts * logit_slices(grid * cfg.warps, num_experts, hidden) * 4
    launch = _nvrtc.CooperativeLaunch(_function(dev, defines, cfg), dev, grid, cfg.warps * 32,
                                      smem_bytes(num_tokens, top_k, hidden, inter, elem, cfg), _ARG_CODES,
                                      eager_pdl=False)
    return _Launch(launch, (num_tokens, hidden, inter, num_experts), scratch, parts_at, -(-scratch // (hidden * elem)))


# moe_decode's parameters: 14 pointers with the routing scale (a double) 13th, then T, H, I, E (int32)
_ARG_CODES = "q" * 12 + "dq" + "i" * 4


def _out_and_scratch(x: torch.Tensor, lc: _Launch, out, workspace) -> tuple[torch.Tensor, int]:
    """(out, scratch address): out [T, H] and the scratch in one allocation when neither is given."""
    num_tokens, hidden = x.shape
    if workspace is not None:
        scratch = workspace.views(x.device, [((lc.scratch,), torch.uint8)])[0].data_ptr()
    elif out is not None:
        scratch = torch.empty(lc.scratch, device=x.device, dtype=torch.uint8).data_ptr()
    else:
        buf = torch.empty(num_tokens + lc.extra_rows, hidden, device=x.device, dtype=x.dtype)
        return buf[:num_tokens], buf.data_ptr() + num_tokens * hidden * x.element_size()
    if out is None:
        out = torch.empty(num_tokens, hidden, device=x.device, dtype=x.dtype)
    return out, scratch


def experts_launch(x: torch.Tensor, w1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                   activation: str, w1_bias=None, w2_bias=None, shared_output=None) -> _Launch:
    """The launch data of :func:`fused_moe_decode` for these arguments (a pure function of their
    shapes and dtypes: callers may keep it for later calls of the same signature)."""
    num_experts, two_inter = w1.shape[:2]
    dtypes = (DTYPE_CODES[x.dtype], DTYPE_CODES[topk_weights.dtype], _dt(shared_output), _dt(w1_bias), _dt(w2_bias),
              topk_ids.dtype == torch.int64)
    return _launch(x.device.index, dtypes, x.shape[0], topk_ids.shape[1], num_experts, x.shape[1], two_inter // 2,
                   x.element_size(), ACTIVATION_CODES[activation], CONFIG)


def run_experts(lc: _Launch, x, w1, w2, topk_weights, topk_ids, w1_bias, w2_bias, shared_output, out,
                workspace) -> torch.Tensor | None:
    """Launch the experts kernel of :func:`experts_launch`'s ``lc``: the output, or None when the
    driver refuses the cooperative launch."""
    out, scratch = _out_and_scratch(x, lc, out, workspace)
    tw = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    args = (x.data_ptr(), w1.data_ptr(), w2.data_ptr(), 0 if w1_bias is None else w1_bias.data_ptr(),
            0 if w2_bias is None else w2_bias.data_ptr(), tw.data_ptr(), topk_ids.data_ptr(),
            0 if shared_output is None else shared_output.data_ptr(), out.data_ptr(), scratch, 0, 0, 0.0, 0,
            *lc.sizes)
    return out if lc.launch(*args) else None


def fused_moe_decode(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, *, activation: str, w1_bias=None, w2_bias=None, shared_output=None,
                     out=None, workspace=None) -> torch.Tensor | None:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) (+ shared_output[t]) in one
    kernel, for a call :func:`unsupported_reason` accepts. Scratch comes from ``workspace`` when
    given. Returns the output, or None when the driver refuses the cooperative launch (the caller
    then runs the staged pipeline)."""
    lc = experts_launch(x, w1, topk_weights, topk_ids, activation=activation, w1_bias=w1_bias, w2_bias=w2_bias,
                        shared_output=shared_output)
    return run_experts(lc, x, w1, w2, topk_weights, topk_ids, w1_bias, w2_bias, shared_output, out, workspace)


def moe_launch(x: torch.Tensor, w1: torch.Tensor, route: tuple, *, top_k: int, activation: str, w1_bias=None,
               w2_bias=None, shared_output=None) -> _Launch:
    """The launch data of the whole-layer kernel (router logits, top-k routing with ``route``:
    :func:`route_key`'s tuple, the semantics of :func:`cute_moe.routing.route_gpu`; then the experts
    of :func:`fused_moe_decode`): a pure function of the arguments' shapes and dtypes."""
    num_experts, two_inter = w1.shape[:2]
    dtypes = (DTYPE_CODES[x.dtype], DTYPE_CODES[torch.float32], _dt(shared_output), _dt(w1_bias), _dt(w2_bias), False)
    return _launch(x.device.index, dtypes, x.shape[0], top_k, num_experts, x.shape[1], two_inter // 2,
                   x.element_size(), ACTIVATION_CODES[activation], CONFIG, route)


def run_moe(lc: _Launch, x, router_weight, w1, w2, correction_bias, routed_scaling_factor, w1_bias, w2_bias,
            shared_output, out, workspace) -> torch.Tensor | None:
    """Launch the whole-layer kernel of :func:`moe_launch`'s ``lc``: the output, or None when the
    driver refuses the cooperative launch."""
    out, scratch = _out_and_scratch(x, lc, out, workspace)
    args = (x.data_ptr(), w1.data_ptr(), w2.data_ptr(), 0 if w1_bias is None else w1_bias.data_ptr(),
            0 if w2_bias is None else w2_bias.data_ptr(), 0, 0, 0 if shared_output is None else shared_output.data_ptr(),
            out.data_ptr(), scratch, router_weight.data_ptr(),
            0 if correction_bias is None else correction_bias.data_ptr(), float(routed_scaling_factor),
            scratch + lc.parts_at, *lc.sizes)
    return out if lc.launch(*args) else None
