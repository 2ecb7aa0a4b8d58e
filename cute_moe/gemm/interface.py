"""torch-facing grouped GEMM: validation, the compiled-kernel cache, and the call.

Kernels are compiled once per static key (arch, dtypes, config, epilogue, E, N, K) with every
token-dependent size symbolic, so a new routing never recompiles. They are compiled with TVM-FFI:
the compiled function takes torch tensors directly and launches on torch's current stream, which
keeps host work per call to a few microseconds and makes the call capturable in a CUDA graph.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..quant import TensorMemo, check_scale_values, weight_scale_blocks
from ..validate import debug_checks_enabled
from .config import EPILOGUES, GemmConfig, pick_config

_TORCH_TO_CUTE = {}
_LOCK = threading.Lock()
_CACHE: dict = {}


def _cute_dtype(dt: torch.dtype):
    import cutlass

    if not _TORCH_TO_CUTE:
        _TORCH_TO_CUTE.update({
            torch.bfloat16: cutlass.BFloat16,
            torch.float16: cutlass.Float16,
            torch.float32: cutlass.Float32,
            torch.float8_e4m3fn: cutlass.Float8E4M3FN,
            torch.int32: cutlass.Int32,
        })
    return _TORCH_TO_CUTE[dt]


@dataclass(frozen=True)
class KernelKey:
    """Everything a compiled grouped GEMM is specialized on."""

    arch: str
    ab_dtype: torch.dtype
    out_dtype: torch.dtype
    config: GemmConfig
    activation: str
    has_bias: bool
    has_row_scale: bool
    masked: bool
    num_experts: int
    n: int
    k: int
    num_sms: int
    scale_mode: str = "none"
    prefetch_weights: bool = False

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.activation != "none" else self.n


def prefetch_weights(config: GemmConfig, segments_ready: bool) -> bool:
    """Whether a GEMM whose segments are ready early loads weights before the previous kernel ends
    (GroupedGemmSm90's prefetch; without clusters only)."""
    return bool(segments_ready) and config.cluster_m == 1


COMPILE_STATS = {"disk": 0, "compiled": 0}  # kernels loaded from the disk cache / JIT-compiled


def compile_kernel(key: KernelKey) -> Callable:
    """The kernel for ``key``: from the in-process cache, else the on-disk cache
    (:mod:`.disk_cache`, ``$CUTE_MOE_CACHE_DIR``), else compiled and exported there. Thread-safe."""
    fn = _CACHE.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _CACHE.get(key)
        if fn is None:
            from . import disk_cache

            fn = disk_cache.load(key)
            if fn is not None:
                COMPILE_STATS["disk"] += 1
            else:
                fn = disk_cache.store(key, _compile(key))
                COMPILE_STATS["compiled"] += 1
            _CACHE[key] = fn
    return fn


def _compile(key: KernelKey, extra_options: str = "") -> Callable:
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    from .grouped_gemm_sm90 import GroupedGemmSm90

    if key.arch != "sm_90a":
        raise NotImplementedError(f"no grouped GEMM kernel for {key.arch} yet (sm_90a only)")
    ab = _cute_dtype(key.ab_dtype)
    m = cute.sym_int()
    a = make_fake_compact_tensor(ab, (m, key.k), stride_order=(1, 0), assumed_align=16)
    b = make_fake_compact_tensor(ab, (key.num_experts, key.n, key.k), stride_order=(2, 1, 0), assumed_align=16)
    c = make_fake_compact_tensor(_cute_dtype(key.out_dtype), (m, key.n_out), stride_order=(1, 0), assumed_align=16)
    seg_len = key.num_experts if key.masked else key.num_experts + 1
    seg = make_fake_compact_tensor(cutlass.Int32, (seg_len,), assumed_align=4)
    bias = (
        make_fake_compact_tensor(ab if key.ab_dtype != torch.float8_e4m3fn else cutlass.BFloat16,
                                 (key.num_experts, key.n), stride_order=(1, 0), assumed_align=4)
        if key.has_bias else None
    )
    row_scale = make_fake_compact_tensor(cutlass.Float32, (m,), assumed_align=4) if key.has_row_scale else None
    sa, sb = _fake_scales(key, m)
    sched = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),), assumed_align=4)
    gemm = GroupedGemmSm90(key.config, key.activation, key.has_bias, key.has_row_scale, key.masked, key.scale_mode,
                           key.prefetch_weights)
    fn = cute.compile(
        gemm, a, b, c, seg, bias, row_scale, sa, sb, sched, cutlass.Int32(1), cutlass.Int32(1), key.num_sms,
        make_fake_stream(use_tvm_ffi_env_stream=True),
        options=f"--gpu-arch {key.arch} --enable-tvm-ffi {extra_options}",
    )
    fn.smem_bytes = gemm.smem_bytes
    return fn


def _fake_scales(key: KernelKey, m):
    """Symbolic fp8 scale tensors of ``key.scale_mode`` (see `grouped_gemm`)."""
    import cutlass
    from cutlass.cute.runtime import make_fake_compact_tensor

    f32, e = cutlass.Float32, key.num_experts
    if key.scale_mode == "none":
        return None, None
    if key.scale_mode == "tensor":
        return (make_fake_compact_tensor(f32, (1,), assumed_align=4),
                make_fake_compact_tensor(f32, (e,), assumed_align=4))
    if key.scale_mode == "token":
        return (make_fake_compact_tensor(f32, (m,), assumed_align=4),
                make_fake_compact_tensor(f32, (e, key.n), stride_order=(1, 0), assumed_align=4))
    kb, nb = -(-key.k // 128), weight_scale_blocks(key.n, key.activation != "none")
    return (make_fake_compact_tensor(f32, (kb, m), stride_order=(1, 0), assumed_align=4),
            make_fake_compact_tensor(f32, (e, nb, kb), stride_order=(2, 1, 0), assumed_align=4))


def _check(cond: bool, msg):
    """Raise ValueError(msg) when cond is false; msg may be a callable so the message is only
    formatted on failure (these checks run on every call)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


_AB_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _scale_mode(fp8: bool, a_scale, b_scale, m: int, e: int, n: int, k: int, gated: bool) -> str:
    """The fp8 scaling mode given by the scale shapes (see `grouped_gemm`); checks them."""
    if not fp8:
        _check(a_scale is None and b_scale is None, "a_scale/b_scale: only fp8 (float8_e4m3fn) operands take scales")
        return "none"
    _check(a_scale is not None and b_scale is not None, "a_scale, b_scale: fp8 operands need both (float32)")
    _check(a_scale.dtype == torch.float32 and b_scale.dtype == torch.float32,
           lambda: f"a_scale/b_scale: expected float32, got {a_scale.dtype}/{b_scale.dtype}")
    _check(a_scale.is_contiguous() and b_scale.is_contiguous(), "a_scale/b_scale: expected contiguous tensors")
    kb, nb = -(-k // 128), weight_scale_blocks(n, gated)
    if a_scale.numel() == 1 and a_scale.dim() <= 1 and b_scale.dim() != 2:  # [1] with b [E, N]: per-token, M = 1
        mode, want_b = "tensor", (e,)
    elif a_scale.dim() == 1:
        mode, want_b = "token", (e, n)
        _check(a_scale.shape[0] == m, lambda: f"a_scale: per-token scales need [{m}], got {tuple(a_scale.shape)}")
    else:
        mode, want_b = "block", (e, nb, kb)
        _check(a_scale.shape == (kb, m),
               lambda: f"a_scale: blockwise scales need [ceil(K/128)={kb}, M={m}] (group-major), got {tuple(a_scale.shape)}")
    _check(tuple(b_scale.shape) == want_b,
           lambda: f"b_scale: {mode} scaling needs shape {list(want_b)}, got {tuple(b_scale.shape)}")
    _check_scale_values(a_scale, b_scale)
    return mode


_CHECKED_B_SCALES = TensorMemo()  # b_scale or the tensor it views -> {(data_ptr, shape)} found valid


def _check_scale_values(a_scale: torch.Tensor, b_scale: torch.Tensor) -> None:
    """Scales must be finite and > 0. b_scale (static weight scales) is read once and remembered on
    the tensor it belongs to (itself or the tensor it is a view of) while that object is alive and
    unmodified (data_ptr, _version), so steady-state calls do not sync, not even with a new view per
    call; a_scale (per call) is read only with debug checks on. Both are skipped while a CUDA graph is
    being captured."""
    base = b_scale if b_scale._base is None else b_scale._base
    view = (b_scale.data_ptr(), tuple(b_scale.shape))
    seen = _CHECKED_B_SCALES.get(base)
    if (seen is None or view not in seen) and check_scale_values("b_scale", b_scale):
        if seen is None:
            seen = set()
            _CHECKED_B_SCALES.put(base, seen)
        seen.add(view)
    if debug_checks_enabled():
        check_scale_values("a_scale", a_scale)


_DEVICE_INFO: dict = {}
_FAST: dict = {}  # plain-tuple key -> compiled kernel: cheaper to hash than a KernelKey

# Tile counters of dynamically scheduled GEMMs: one zeroed int32 pair per (device, stream), slots of one
# buffer per device allocated on the first call outside CUDA-graph capture. The kernel's last CTA
# zeroes its pair again, so launches on one stream (stream-ordered, PDL-waited) reuse it, and GEMMs on
# different streams never share one (up to COUNTER_SLOTS streams per device; more reuse slots in turn).
# A graph keeps the pair of the stream it was captured on.
COUNTER_SLOTS = 256
_COUNTERS: dict = {}  # device index -> int32 [COUNTER_SLOTS, 2]
_COUNTER_SLOT: dict = {}  # (device index, raw stream) -> [2] view


def _tile_counter(device_index: int, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(counter pair, 1) for the current stream, or (``dummy``, 0): static order, when the first
    dynamically scheduled call on this device happens under graph capture (no zeroed buffer yet)."""
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    pair = _COUNTER_SLOT.get((device_index, stream))
    if pair is not None:
        return pair, 1
    buf = _COUNTERS.get(device_index)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            return dummy, 0
        buf = _COUNTERS[device_index] = torch.zeros(COUNTER_SLOTS, 2, dtype=torch.int32,
                                                    device=torch.device("cuda", device_index))
    slots = sum(1 for d, _ in _COUNTER_SLOT if d == device_index)
    pair = _COUNTER_SLOT[(device_index, stream)] = buf[slots % COUNTER_SLOTS]
    return pair, 1


def _device_info(device: torch.device) -> tuple[str, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    info = _DEVICE_INFO.get(idx)
    if info is None:
        props = torch.cuda.get_device_properties(idx)
        arch = f"sm_{props.major}{props.minor}" + ("a" if props.major >= 9 else "")
        info = _DEVICE_INFO[idx] = (arch, props.multi_processor_count)
    return info


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    masked_m: torch.Tensor | None = None,
    activation: str = "none",
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    segments_ready: bool = False,
) -> torch.Tensor:
    """Grouped GEMM over experts on the GPU: ``out[rows of e] = epilogue(a[rows of e] @ b[e].T)``.

    Layouts (exactly one of ``cu_seqlens`` / ``masked_m``):
      varlen: a `[M, K]`, cu_seqlens int32 `[E+1]` (expert e owns rows cu[e]:cu[e+1]), out `[M, N_out]`;
      masked: a `[E, max_m, K]`, masked_m int32 `[E]` (rows 0:masked_m[e] of slot e), out `[E, max_m, N_out]`.
    b: `[E, N, K]` weights (vLLM/HF convention, K contiguous). activation "none" gives N_out = N;
    a gated activation ("silu", "gelu", "swiglu_oai") treats b's rows [0, N/2) as gate and [N/2, N) as
    up (w1 `[E, 2I, H]`) and gives N_out = N/2. bias: `[E, N]`, added before the activation.
    row_scale: float32 per row of ``a`` (e.g. the router weight), applied last.
    fp8 (a, b float8_e4m3fn, K-major; out bf16 by default) takes float32 scales, dequantizing
    ``a = q_a * a_scale``, ``b = q_b * b_scale`` in the accumulator, with the mode read from a_scale:
      per-tensor: a_scale `[1]`, b_scale `[E]` (one per expert);
      per-token:  a_scale `[M]` (per row of a), b_scale `[E, N]` (per output channel);
      blockwise:  a_scale `[ceil(K/128), M]` (1x128 groups, group-major), b_scale
                  `[E, ceil(N/128), ceil(K/128)]` (128x128 blocks: DeepSeek-V3 weight_scale_inv);
                  with a gated activation the gate and up halves are blocked separately,
                  `[E, 2*ceil(N/256), ceil(K/128)]` (cute_moe.quant.quantize_blockwise_gated_weight).
    (a_scale `[1]` with b_scale `[E, N]` is per-token with M = 1.) Scales must be finite and > 0, else
    ValueError naming the argument: b_scale (static weights) is read once (a host sync) and remembered
    while its tensor, or the tensor it views, is alive and unmodified (same data_ptr and _version), so
    steady-state calls do no host sync; a_scale (per call) is read only with debug checks on
    (``cute_moe.set_debug_checks``); neither while a CUDA graph is being captured.
    Rows of out outside every expert's segment are not written.
    segments_ready: cu_seqlens / masked_m were complete before the kernel launched just before this
    GEMM started (e.g. the layer's plan, two launches back); the GEMM then reads them and starts
    streaming weights while that kernel finishes (programmatic dependent launch). Leave it False when
    the previous kernel writes them.
    """
    masked = masked_m is not None
    _check(isinstance(segments_ready, bool), lambda: f"segments_ready: expected a bool, got {segments_ready!r}")
    _check((cu_seqlens is not None) != masked, "pass exactly one of cu_seqlens (varlen layout) or masked_m (masked layout)")
    _check(activation in EPILOGUES, lambda: f"activation: expected one of {EPILOGUES}, got {activation!r}")
    _check(a.is_cuda, lambda: f"a: expected a CUDA tensor, got device {a.device}")
    _check(b.dim() == 3, lambda: f"b: expected [E, N, K], got shape {tuple(b.shape)}")
    num_experts, n, k = b.shape
    _check(a.dtype in _AB_DTYPES, lambda: f"a: expected bfloat16, float16 or float8_e4m3fn, got {a.dtype}")
    _check(b.dtype == a.dtype, lambda: f"b: expected dtype {a.dtype} (same as a), got {b.dtype}")
    _check(a.dtype != torch.float8_e4m3fn or (k % 16 == 0), lambda: f"b: fp8 needs K a multiple of 16, got K={k}")
    _check(b.device == a.device, lambda: f"b: expected device {a.device}, got {b.device}")
    _check(b.is_contiguous(), "b: expected a contiguous [E, N, K] tensor")
    _check(k % 8 == 0 and n % 8 == 0, lambda: f"b: K and N must be multiples of 8 (16-byte TMA rows), got N={n}, K={k}")
    gated = activation != "none"
    _check(not gated or n % 16 == 0, lambda: f"b: a gated activation needs N = 2I with I a multiple of 8, got N={n}")
    n_out = n // 2 if gated else n
    if masked:
        _check(a.dim() == 3 and a.shape[0] == num_experts and a.shape[2] == k,
               lambda: f"a: expected [E={num_experts}, max_m, K={k}] for the masked layout, got {tuple(a.shape)}")
        seg = masked_m
        _check(seg.dim() == 1 and seg.shape[0] == num_experts, lambda: f"masked_m: expected shape [{num_experts}], got {tuple(seg.shape)}")
        max_m = a.shape[1]
        a2 = a.reshape(-1, k)
    else:
        _check(a.dim() == 2 and a.shape[1] == k, lambda: f"a: expected [M, K={k}], got {tuple(a.shape)}")
        seg = cu_seqlens
        _check(seg.dim() == 1 and seg.shape[0] == num_experts + 1,
               lambda: f"cu_seqlens: expected shape [{num_experts + 1}], got {tuple(seg.shape)}")
        max_m = 0
        a2 = a
    _check(seg.dtype == torch.int32, lambda: f"{'masked_m' if masked else 'cu_seqlens'}: expected int32, got {seg.dtype}")
    _check(seg.device == a.device, lambda: f"{'masked_m' if masked else 'cu_seqlens'}: expected device {a.device}, got {seg.device}")
    _check(a2.is_contiguous(), "a: expected contiguous rows")
    fp8 = a.dtype == torch.float8_e4m3fn
    scale_mode = _scale_mode(fp8, a_scale, b_scale, a2.shape[0], num_experts, n, k, gated)
    if scale_mode == "tensor":
        a_scale = a_scale.reshape(1)
    out_dtype = out.dtype if out is not None else (out_dtype or (torch.bfloat16 if fp8 else a.dtype))
    m_rows = a2.shape[0]
    if out is None:
        out = torch.empty((*a.shape[:-1], n_out), dtype=out_dtype, device=a.device)
    else:
        _check(out.shape == (*a.shape[:-1], n_out), lambda: f"out: expected shape {(*a.shape[:-1], n_out)}, got {tuple(out.shape)}")
        _check(out.device == a.device and out.is_contiguous(), "out: expected a contiguous tensor on a's device")
    _check(out_dtype in (torch.bfloat16, torch.float16, torch.float32), lambda: f"out: expected bf16/fp16/fp32, got {out_dtype}")
    if bias is not None:
        _check(bias.shape == (num_experts, n) and bias.is_contiguous() and bias.device == a.device,
               lambda: f"bias: expected a contiguous [{num_experts}, {n}] tensor on {a.device}, got {tuple(bias.shape)}")
        bias = bias.to(torch.bfloat16 if fp8 else a.dtype)
    if row_scale is not None:
        _check(row_scale.dtype == torch.float32 and row_scale.numel() == m_rows and row_scale.device == a.device,
               lambda: f"row_scale: expected float32 with {m_rows} elements on {a.device}")
        row_scale = row_scale.reshape(m_rows)
    if m_rows == 0:
        return out
    arch, num_sms = _device_info(a.device)
    if config is None:
        config = pick_config(m_rows, n, k, num_experts, gated, num_sms, max_m, scale_mode == "block")
    fast = (arch, a.dtype, out_dtype, config, activation, bias is not None, row_scale is not None,
            masked, num_experts, n, k, num_sms, scale_mode, prefetch_weights(config, segments_ready))
    fn = _FAST.get(fast)
    if fn is None:
        fn = _FAST[fast] = compile_kernel(KernelKey(*fast))
    counter, sched_on = _tile_counter(a.device.index, seg) if config.dynamic else (seg, 0)
    fn(a2, b, out.view(m_rows, n_out), seg, bias, row_scale, a_scale, b_scale, counter, max_m, sched_on)
    return out
