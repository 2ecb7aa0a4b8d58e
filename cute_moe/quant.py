"""FP8 (e4m3) quantization emulation shared by the reference path and the fp8 kernels' tests.

Every scheme computes ``scale = max(amax, AMAX_EPS) / 448`` in float32 over its group, stores
``q = clamp(x / scale, -448, 448)`` as ``torch.float8_e4m3fn`` and dequantizes as ``q * scale``
(``AMAX_EPS`` keeps all-zero groups at a tiny scale instead of 0/0 = NaN). Schemes per ``mode``
(activations [M, K] / expert weights [E, N, K]):

- ``per_tensor``: one scale ``[]`` / one scale per expert ``[E, 1, 1]`` (vLLM, Mixtral-FP8).
- ``per_token``: one scale per row ``[M, 1]`` / one per output channel ``[E, N, 1]``.
- ``blockwise``: 1x128 groups ``[M, ceil(K/128)]`` / 128x128 tiles ``[E, ceil(N/128), ceil(K/128)]``
  (DeepSeek-V3's ``weight_scale_inv``: dequantized = q * scale_inv). The gated w1 [E, 2I, H] is
  blocked per half (gate, then up: ``[E, 2*ceil(I/128), ceil(H/128)]``, as vLLM stores w13's
  ``weight_scale_inv``), so no block straddles the two; the same as whole-matrix blocks when
  I % 128 == 0.

Ragged trailing groups/blocks (K or N not a multiple of 128) are scaled by the amax of the elements
they do contain. Activation scales are dynamic (computed from the data on every call).

Weight scales must be finite and > 0: :meth:`QuantizedWeights.check_scales` raises a ValueError naming
the scale otherwise. It reads each scale tensor once (one host sync) and remembers it while that
tensor object is alive and unmodified (:class:`TensorMemo`), so steady-state calls do not sync.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AMAX_EPS", "BLOCK", "FP8_DTYPE", "FP8_MAX", "QUANT_DTYPES", "QUANT_MODES", "QuantConfig",
    "QuantizedWeights", "dequantize", "dequantize_blockwise_act", "dequantize_blockwise_weight",
    "dequantize_per_channel", "dequantize_per_expert", "dequantize_per_tensor", "dequantize_per_token",
    "dequantize_weight", "fake_quantize_act", "quantize_blockwise_act", "quantize_blockwise_gated_weight",
    "quantize_blockwise_weight", "quantize_per_channel", "quantize_per_expert", "quantize_per_tensor",
    "quantize_per_token", "quantize_weights", "weight_scale_blocks",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-10
BLOCK = 128
QUANT_MODES = ("per_tensor", "per_token", "blockwise")
QUANT_DTYPES = ("e4m3",)


@dataclass(frozen=True)
class QuantConfig:
    """Which fp8 scheme a layer uses: ``mode`` in QUANT_MODES, ``dtype`` in QUANT_DTYPES."""

    mode: str
    dtype: str = "e4m3"

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ValueError(f"mode: expected one of {QUANT_MODES}, got {self.mode!r}")
        if self.dtype not in QUANT_DTYPES:
            raise ValueError(f"dtype: expected one of {QUANT_DTYPES}, got {self.dtype!r}")


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version`` (bumped by every in-place write), or None for inference tensors, which keep no
    version counter."""
    try:
        return t._version
    except RuntimeError:
        return None


class TensorMemo:
    """Values derived from a tensor (a check passed, a re-laid-out copy), kept while that very tensor
    object is alive and unmodified (same ``data_ptr`` and ``_version``): static weights are checked or
    converted once, not on every call. Keyed by object identity, so a new tensor that reuses freed
    memory is never mistaken for an old one."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, t: torch.Tensor, default=None):
        entry = self._entries.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == (t.data_ptr(), tensor_version(t)):
            return entry[2]
        return default

    def put(self, t: torch.Tensor, value) -> None:
        key = id(t)
        entries = self._entries

        def drop(ref, key=key):
            if entries.get(key, (None,))[0] is ref:
                entries.pop(key, None)

        entries[key] = (weakref.ref(t, drop), (t.data_ptr(), tensor_version(t)), value)


def _readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read now: not a meta/fake tensor (torch.compile tracing) and no
    CUDA graph capture on the current stream (a host sync would break it)."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        is_fake = None
    if is_fake is not None and is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_scale_values(name: str, scale: torch.Tensor) -> bool:
    """Raise ValueError naming ``name`` unless every element of ``scale`` is finite and > 0 (a
    dequantization scale must be). Reads the values, so it syncs with the host; returns False without
    checking where they cannot be read now (fake/meta tensors, CUDA graph capture), else True."""
    if not _readable(scale):
        return False
    ok = torch.isfinite(scale) & (scale > 0)
    if not bool(ok.all()):
        index = [int(i) for i in (~ok).nonzero()[0]]
        raise ValueError(f"{name}: expected finite scales > 0, got {float(scale[tuple(index)])} at index {index}")
    return True


_CHECKED_SCALES = TensorMemo()


@dataclass(frozen=True)
class QuantizedWeights:
    """Quantized expert weights for the ``quant=`` path: fp8 ``w1_q`` [E, 2I, H], ``w2_q`` [E, H, I]
    and their float32 scales in ``mode``'s weight layout (see the module docstring).

    The scales are checked (finite, > 0) on first use by ``fused_moe``/``moe`` (:meth:`check_scales`),
    not at construction, so building one per call (as ``nn.MoE`` does) costs nothing."""

    w1_q: torch.Tensor
    w1_scale: torch.Tensor
    w2_q: torch.Tensor
    w2_scale: torch.Tensor
    mode: str

    def check_scales(self) -> None:
        """Raise ValueError (naming ``quant.w1_scale`` / ``quant.w2_scale``) unless every scale is finite
        and > 0. Each scale tensor is read once (a host sync) and remembered while it is alive and
        unmodified; skipped, and not remembered, during CUDA graph capture and on fake tensors."""
        for name, scale in (("quant.w1_scale", self.w1_scale), ("quant.w2_scale", self.w2_scale)):
            if not _CHECKED_SCALES.get(scale, False) and check_scale_values(name, scale):
                _CHECKED_SCALES.put(scale, True)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 scale for a group whose largest magnitude is ``amax``. Divides by a tensor, not a Python
    number: CUDA torch turns division by a host scalar into multiplication by its reciprocal, which is
    an ulp off IEEE division (what the CPU and the fp8 kernels compute) for some amax values, and one
    ulp of scale moves many fp8 codes."""
    amax = amax.float().clamp(min=AMAX_EPS)
    return amax / torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range and rounded to fp8 (``scale`` broadcastable)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _quantize(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one scale per element of ``amax`` (broadcastable to ``x``)."""
    scale = _scale(amax)
    return _cast(x, scale), scale


def _blocks(x: torch.Tensor, block: int, ndims: int) -> torch.Tensor:
    """|x| zero-padded to whole blocks along its last ``ndims`` dims, each dim split as (n, block)."""
    pad: list[int] = []
    for n in reversed(x.shape[x.dim() - ndims:]):
        pad += [0, -n % block]
    padded = F.pad(x.float().abs(), pad)
    for i in range(ndims):
        dim = x.dim() - ndims + 2 * i
        padded = padded.unflatten(dim, (-1, block))
    return padded


def _expand(scale: torch.Tensor, block: int, sizes: torch.Size) -> torch.Tensor:
    """Repeat each scale ``block`` times along the trailing ``len(sizes)`` dims, cropped to ``sizes``."""
    for i, n in enumerate(sizes):
        dim = scale.dim() - len(sizes) + i
        scale = scale.repeat_interleave(block, dim=dim).narrow(dim, 0, n)
    return scale


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: (q, scale []); an empty ``x`` gets the epsilon scale."""
    amax = x.float().abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
    return _quantize(x, amax)


def quantize_per_expert(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale for each expert matrix of ``w`` [E, N, K]: (q, scale [E, 1, 1])."""
    return _quantize(w, w.float().abs().amax(dim=(1, 2), keepdim=True))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of ``x`` [M, K]: (q, scale [M, 1])."""
    return _quantize(x, x.float().abs().amax(dim=-1, keepdim=True))


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per output channel of ``w`` [E, N, K]: (q, scale [E, N, 1])."""
    return _quantize(w, w.float().abs().amax(dim=-1, keepdim=True))


def quantize_blockwise_act(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per 1 x ``group`` slice of ``x`` [M, K]: (q, scale [M, ceil(K/group)])."""
    scale = _scale(_blocks(x, group, 1).amax(-1))
    return _cast(x, _expand(scale, group, x.shape[-1:])), scale


def quantize_blockwise_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per ``block`` x ``block`` tile of ``w`` [E, N, K]:
    (q, scale_inv [E, ceil(N/block), ceil(K/block)]), dequantized as ``q * scale_inv``."""
    scale = _scale(_blocks(w, block, 2).amax(dim=(-3, -1)))
    return _cast(w, _expand(scale, block, w.shape[-2:])), scale


def weight_scale_blocks(n: int, gated: bool, block: int = BLOCK) -> int:
    """Scale rows of a blockwise weight with ``n`` rows: gated (w1, [gate | up]) halves are blocked
    separately."""
    return 2 * -(-(n // 2) // block) if gated else -(-n // block)


def quantize_blockwise_gated_weight(w1: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blockwise_weight` of w1 [E, 2I, H]'s gate and up halves, concatenated:
    (q [E, 2I, H], scale_inv [E, 2*ceil(I/block), ceil(H/block)])."""
    (gq, gs), (uq, us) = (quantize_blockwise_weight(half, block) for half in w1.chunk(2, dim=-2))
    return torch.cat([gq, uq], dim=-2), torch.cat([gs, us], dim=-2)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32 for the broadcasting layouts (per-tensor/expert/token/channel)."""
    return q.float() * scale


dequantize_per_tensor = dequantize_per_expert = dequantize_per_token = dequantize_per_channel = dequantize


def dequantize_blockwise_act(q: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_act`, in float32."""
    return q.float() * _expand(scale, group, q.shape[-1:])


def dequantize_blockwise_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                                gated: bool | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_weight` and (``gated=True``: w1, its gate and up halves
    blocked apart) of :func:`quantize_blockwise_gated_weight`, in float32. ``gated=None`` tells the
    layouts apart by the scale's shape, which only works where their block counts differ: with
    I % 128 in (64, 128) both have 2*ceil(I/128) rows of scales, so callers that know should say."""
    n = q.shape[-2]
    if gated is None:
        gated = (scale_inv.shape[-2] != weight_scale_blocks(n, False, block)
                 and scale_inv.shape[-2] == weight_scale_blocks(n, True, block))
    if gated:
        return torch.cat([dequantize_blockwise_weight(hq, hs, block, gated=False)
                          for hq, hs in zip(q.chunk(2, dim=-2), scale_inv.chunk(2, dim=-2))], dim=-2)
    return q.float() * _expand(scale_inv, block, q.shape[-2:])


_WEIGHT_SCHEMES = {
    "per_tensor": (quantize_per_expert, dequantize),
    "per_token": (quantize_per_channel, dequantize),
    "blockwise": (quantize_blockwise_weight, dequantize_blockwise_weight),
}
_ACT_SCHEMES = {
    "per_tensor": (quantize_per_tensor, dequantize),
    "per_token": (quantize_per_token, dequantize),
    "blockwise": (quantize_blockwise_act, dequantize_blockwise_act),
}


def _mode(config: QuantConfig | str) -> str:
    return config.mode if isinstance(config, QuantConfig) else QuantConfig(config).mode


def quantize_weights(w1: torch.Tensor, w2: torch.Tensor, config: QuantConfig | str) -> QuantizedWeights:
    """Quantize expert weights w1 [E, 2I, H] and w2 [E, H, I] in ``config``'s weight scheme."""
    mode = _mode(config)
    quantize, _ = _WEIGHT_SCHEMES[mode]
    w1_q, w1_scale = (quantize_blockwise_gated_weight if mode == "blockwise" else quantize)(w1)
    w2_q, w2_scale = quantize(w2)
    return QuantizedWeights(w1_q, w1_scale, w2_q, w2_scale, mode)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, mode: str, gated: bool | None = None) -> torch.Tensor:
    """float32 weights [E, N, K] from ``q`` and its ``mode`` weight scale (also for E-slices);
    ``gated``: whether this is w1 (blockwise scales of w1 block its halves apart, see
    :func:`dequantize_blockwise_weight`; None: told from the scale's shape)."""
    if mode == "blockwise":
        return dequantize_blockwise_weight(q, scale, gated=gated)
    return _WEIGHT_SCHEMES[mode][1](q, scale)


def fake_quantize_act(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantize then dequantize activations [M, K] in ``mode``'s activation scheme (float32):
    the values an fp8 kernel multiplies, with the scale folded back in."""
    quantize, dequantize_fn = _ACT_SCHEMES[mode]
    return dequantize_fn(*quantize(x))
