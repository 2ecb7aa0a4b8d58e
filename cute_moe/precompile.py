"""Ahead-of-time compilation of the kernels a model needs: ``cute_moe.warmup(layer_or_shapes, tokens)``.

For each MoE layer (a ``cute_moe.nn.MoE``, any module containing some, or a ``MoEShape``) and each
token count, the grouped-GEMM configurations ``pick_config`` chooses for that many routed rows are
compiled (GEMM1 with the layer's activation and bias, GEMM2), exactly as ``cute_moe/layer.py`` will
request them, and kept in the on-disk cache (``$CUTE_MOE_CACHE_DIR``, see
:mod:`cute_moe.gemm.disk_cache`), so a restarted process loads them instead of compiling. On a GPU
the NVRTC routing/plan/permute/combine kernels of each layer are compiled and loaded too (they have
their own disk cache, see :mod:`cute_moe._nvrtc`) by running them once on a one-token dummy input,
and so is the one-kernel decode path (:mod:`cute_moe.decode`) for the token counts it takes.

Without a GPU the GEMMs are cross-compiled for ``arch``/``num_sms`` (default sm_90a, 132 SMs as on
H100/H200 SXM) to fill a cache directory that GPU machines can then use; NVRTC kernels are skipped.
Token counts between the listed ones may pick another tile configuration (compiled on first use).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch

_GEMM_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Layer:
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: torch.dtype
    activation: str
    w1_bias: bool
    w2_bias: bool
    gemm_ok: bool
    routing: tuple  # sorted (name, value) items of the routing options
    correction_bias: torch.dtype | None
    quant: str | None = None  # fp8 weights: QuantizedWeights.mode
    router_dtypes: tuple = (torch.float32,)  # router weight dtypes the layer's moe calls may pass


def _layers(obj, *, dtype, activation, bias, routing, quant=None) -> list[tuple[_Layer, torch.device | None]]:
    """(layer spec, device of its weights or None) for every layer in ``obj``."""
    from .nn import MoE
    from .shapes import MoEShape

    if isinstance(obj, MoEShape):
        opts = dict(routing or {})
        cb = opts.pop("correction_bias", None)
        return [(_Layer(obj.num_experts, obj.top_k, obj.hidden, obj.intermediate, dtype, activation, bias, bias,
                        True, tuple(sorted(opts.items())), None if cb is None else torch.float32, quant,
                        # a checkpoint's router weight (the model dtype) or nn.MoE's float32 copy
                        tuple(dict.fromkeys((dtype, torch.float32)))), None)]
    if isinstance(obj, torch.nn.Module):
        found = []
        for m in obj.modules():
            if isinstance(m, MoE):
                w2 = m.w2 if m.quant_mode is None else m.w2_q
                num_experts, hidden, inter = w2.shape
                cb = m.correction_bias
                spec = _Layer(num_experts, m.top_k, hidden, inter,
                              m.w1.dtype if m.quant_mode is None else dtype, m.activation,
                              m.w1_bias is not None, m.w2_bias is not None,
                              not m.apply_router_weight_on_input,
                              tuple(sorted(m.routing.items())), None if cb is None else cb.dtype, m.quant_mode,
                              (m.router_weight.dtype,))
                found.append((spec, w2.device))
        if not found:
            raise ValueError(f"warmup: {type(obj).__name__} contains no cute_moe.nn.MoE layer")
        return found
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [item for o in obj for item in _layers(o, dtype=dtype, activation=activation, bias=bias,
                                                      routing=routing, quant=quant)]
    raise TypeError(f"warmup: expected a cute_moe.nn.MoE (or a module containing some), a MoEShape or a list "
                    f"of those, got {type(obj).__name__}")


_SCALE_MODES = {"per_tensor": "tensor", "per_token": "token", "blockwise": "block"}


def gemm_keys(spec: _Layer, num_tokens: int, arch: str, num_sms: int) -> list:
    """The KernelKeys ``cute_moe/layer.py`` requests for ``num_tokens`` tokens (flat layout: T*k rows):
    GEMM1 [E, 2I, H] with the gated activation, then GEMM2 [E, H, I]; fp8 operands with the
    layer's scaling mode (output in the activation dtype) for a quantized layer."""
    from .gemm.config import pick_config
    from .gemm.interface import KernelKey, prefetch_weights

    if not spec.gemm_ok or spec.dtype not in _GEMM_DTYPES or num_tokens <= 0 or spec.hidden % 8 or spec.inter % 8:
        return []
    rows, e, h, i = num_tokens * spec.top_k, spec.num_experts, spec.hidden, spec.inter
    dt = ab = spec.dtype
    mode = "none"
    if spec.quant is not None:
        if h % 16 or i % 16:
            return []  # the layer runs the reference for these (layer._fp8_unsupported_reason)
        ab, mode = torch.float8_e4m3fn, _SCALE_MODES[spec.quant]
    block = mode == "block"
    c1 = pick_config(rows, 2 * i, h, e, True, num_sms, 0, block)
    c2 = pick_config(rows, h, i, e, False, num_sms, 0, block)
    # the layer's GEMMs run after its plan: segments_ready
    return [KernelKey(arch, ab, dt, c1, spec.activation, spec.w1_bias, False, False, e, 2 * i, h, num_sms, mode,
                      prefetch_weights(c1, True)),
            KernelKey(arch, ab, dt, c2, "none", spec.w2_bias, False, False, e, h, i, num_sms, mode,
                      prefetch_weights(c2, True))]


def _warm_nvrtc(spec: _Layer, device: torch.device, gemms: bool, shared_output: bool) -> None:
    """Run routing (and route_and_plan, plan, permute, combine when the GEMMs run on cute) once on one
    dummy token, as ``cute_moe.moe`` / ``layer.fused_moe`` would: compiles and loads their NVRTC
    specializations."""
    from . import decode
    from .permute import combine, permute, permute_fp8, permute_fp8_per_tensor, quantize_fp8
    from .plan import make_plan, route_and_plan
    from .routing import route_gpu

    e, h = spec.num_experts, spec.hidden
    cb = None if spec.correction_bias is None else torch.zeros(e, dtype=spec.correction_bias, device=device)
    weights, ids = route_gpu(torch.randn(1, e, device=device), spec.top_k, correction_bias=cb, **dict(spec.routing))
    if gemms:
        route_and_plan(torch.randn(1, e, device=device), spec.top_k, correction_bias=cb, **dict(spec.routing),
                       fused=True)
        plan = make_plan(ids, e)
        x = torch.zeros(1, h, dtype=spec.dtype, device=device)
        if spec.quant is None:
            xp = permute(x, plan)
        else:
            scaling = _SCALE_MODES[spec.quant]
            xp = permute_fp8_per_tensor(x, plan)[0] if scaling == "tensor" else permute_fp8(x, plan, scaling=scaling)[0]
            quantize_fp8(torch.zeros(xp.shape[0], spec.inter, dtype=spec.dtype, device=device), scaling=scaling,
                         num_rows=plan.cu_seqlens[e:])
        y = torch.zeros(xp.shape[0], h, dtype=spec.dtype, device=device)
        addend = torch.zeros(1, h, dtype=spec.dtype, device=device) if shared_output else None
        combine(y, plan, weights, addend=addend)
        if spec.quant is None:  # the one-kernel decode path of small-T bf16/fp16 calls: experts, and whole layer
            routing = dict(spec.routing)
            routes = [decode.route_spec(e, rdt, spec.top_k, routing.get("scoring", "softmax"),
                                        routing.get("renormalize", False), routing.get("num_groups"),
                                        routing.get("topk_groups"), spec.correction_bias)
                      for rdt in spec.router_dtypes]
            for r in [None, *(r for r in routes if not isinstance(r, str))]:
                decode.precompile(device.index if device.index is not None else torch.cuda.current_device(),
                                  spec.dtype, spec.top_k, e, h, spec.inter, spec.activation,
                                  w1_bias=spec.dtype if spec.w1_bias else None,
                                  w2_bias=spec.dtype if spec.w2_bias else None,
                                  shared_output=spec.dtype if shared_output else None, route=r)
    torch.cuda.synchronize(device)


class _Progress:
    """tqdm when installed, else one printed line per task."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="cute_moe warmup", unit="kernel")
            except ImportError:
                pass

    def step(self, label: str, seconds: float, how: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label} ({how})", refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"cute_moe warmup [{self.done}/{self.total}] {label}: {how} in {seconds:.2f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _label(key) -> str:
    c = key.config
    gemm = "gemm1 " + key.activation if key.activation != "none" else "gemm2"
    return f"{gemm} E={key.num_experts} N={key.n} K={key.k} tile {c.tile_m}x{c.tile_n}" + \
        (f" cluster {c.cluster_m}" if c.cluster_m > 1 else "")


def warmup(shapes_or_layer, tokens: Iterable[int] = (1, 64, 1024, 8192), *, dtype: torch.dtype = torch.bfloat16,
           activation: str = "silu", bias: bool = False, routing: dict | None = None, quant: str | None = None,
           shared_output: bool = False,
           device: torch.device | str | None = None, arch: str | None = None, num_sms: int | None = None,
           progress: bool = True) -> dict:
    """Compile ahead of time every kernel the layers in ``shapes_or_layer`` need for ``tokens`` tokens.

    ``shapes_or_layer``: a ``cute_moe.nn.MoE``, a module containing MoE layers (e.g. a whole model),
    a ``MoEShape``, or a list of those. For a MoEShape, ``dtype``, ``activation``, ``bias`` (both
    GEMMs), ``routing`` (route keywords, e.g. ``ROUTING_PRESETS['deepseek_v3']``) describe the call;
    a layer brings its own; ``quant`` (a QUANT_MODES name) makes a MoEShape's GEMMs the fp8 ones
    (a quantized ``nn.MoE`` brings its mode). ``shared_output=True`` also warms the combine variant with a shared-expert
    addend. The device is ``device``, else the layer's if on CUDA, else the current CUDA device; with
    no GPU the GEMMs are cross-compiled for ``arch`` (default ``sm_90a``) and ``num_sms`` (default
    132) into the disk cache only. Shows a tqdm bar (plain lines without tqdm; ``progress=False``
    for silence). Returns counts: GEMM kernels needed, how many were compiled / loaded from the disk
    cache / already in memory, NVRTC layer specs warmed, seconds, and the cache directory.
    """
    from .gemm import disk_cache, interface

    start = time.perf_counter()
    if quant is not None:
        from .quant import QUANT_MODES

        if quant not in QUANT_MODES:
            raise ValueError(f"quant: expected None or one of {QUANT_MODES}, got {quant!r}")
    specs = list(dict.fromkeys(_layers(shapes_or_layer, dtype=dtype, activation=activation, bias=bias,
                                       routing=routing, quant=quant)))
    tokens = sorted({int(t) for t in tokens})
    gpu = None
    if device is not None:
        gpu = torch.device(device)
    elif any(d is not None and d.type == "cuda" for _, d in specs):
        gpu = next(d for _, d in specs if d is not None and d.type == "cuda")
    elif torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
    if gpu is not None and gpu.type != "cuda":
        gpu = None
    if gpu is not None:
        dev_arch, dev_sms = interface._device_info(gpu)
        arch, num_sms = arch or dev_arch, num_sms or dev_sms
    else:
        arch, num_sms = arch or "sm_90a", num_sms or 132

    keys = []
    for spec, _ in specs:
        for t in tokens:
            keys += gemm_keys(spec, t, arch, num_sms) if arch == "sm_90a" else []
    keys = list(dict.fromkeys(keys))
    nvrtc = list(dict.fromkeys(spec for spec, _ in specs)) if gpu is not None else []
    bar = _Progress(len(keys) + len(nvrtc), progress)
    result = {"gemm_kernels": len(keys), "compiled": 0, "from_disk": 0, "in_memory": 0, "nvrtc_layers": 0,
              "arch": arch, "num_sms": num_sms, "cache_dir": disk_cache.cache_dir()}
    try:
        for key in keys:
            t0 = time.perf_counter()
            before = dict(interface.COMPILE_STATS)
            if key in interface._CACHE:
                how = "in_memory"
            else:
                interface.compile_kernel(key)
                how = "compiled" if interface.COMPILE_STATS["compiled"] > before["compiled"] else "from_disk"
            result[how] += 1
            bar.step(_label(key), time.perf_counter() - t0, how.replace("_", " "))
        for spec in nvrtc:
            t0 = time.perf_counter()
            _warm_nvrtc(spec, gpu, spec.gemm_ok and arch == "sm_90a", shared_output)
            result["nvrtc_layers"] += 1
            bar.step(f"routing/plan/permute/combine E={spec.num_experts} k={spec.top_k} H={spec.hidden}",
                     time.perf_counter() - t0, "nvrtc")
    finally:
        bar.close()
    result["seconds"] = time.perf_counter() - start
    return result
