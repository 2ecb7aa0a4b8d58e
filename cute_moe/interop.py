"""torch <-> cupy interop through DLPack (zero copy).

Internally every op works on torch tensors; public functions accept torch tensors or cupy arrays and
hand results back in the caller's type. CuPy kernels launch on torch's current stream so they order
correctly with torch work and are captured by torch CUDA graphs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

TORCH = "torch"
CUPY = "cupy"


def _is_cupy(x: Any) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def array_kind(*xs: Any) -> str:
    """'cupy' if the first non-None argument is a cupy array, else 'torch'."""
    for x in xs:
        if x is not None:
            return CUPY if _is_cupy(x) else TORCH
    return TORCH


def as_torch(x: Any, name: str) -> torch.Tensor | None:
    """View a torch tensor or cupy array as a torch tensor (no copy); None passes through."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if _is_cupy(x):
        return torch.from_dlpack(x)
    raise TypeError(f"{name}: expected a torch.Tensor or cupy.ndarray, got {type(x).__name__}")


def to_kind(t: torch.Tensor | None, kind: str):
    """Return ``t`` in the caller's array type (no copy)."""
    if t is None or kind == TORCH:
        return t
    import cupy

    return cupy.from_dlpack(t)


def current_cupy_stream(device: torch.device):
    """torch's current stream on ``device`` as a cupy ExternalStream (for CuPy kernel launches)."""
    import cupy

    s = torch.cuda.current_stream(device)
    return cupy.cuda.ExternalStream(s.cuda_stream, device.index if device.index is not None else 0)
