"""Reusable device memory for the layer's intermediate tensors.

``fused_moe(..., out=out, workspace=ws)`` / ``moe(...)`` take the routing plan, the permuted rows,
GEMM1's output, GEMM2's output (and, in fp8, the quantized rows and their scales) as views of one
buffer that ``ws`` keeps between calls, so a call allocates nothing once ``ws`` has grown to the
largest shape it serves. Kernels run in stream order, so reusing ``ws`` for the next call on the same
stream is safe; give each stream its own workspace.
"""

from __future__ import annotations

import torch

_ALIGN = 256  # bytes: every view starts on a TMA- and vector-friendly boundary


class Workspace:
    """A growable byte buffer carved into typed views (see the module docstring)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._last: tuple = (None, None)  # (device, specs) of the last call and its views

    @property
    def nbytes(self) -> int:
        """Bytes held now (0 before the first use)."""
        return 0 if self._buf is None else self._buf.numel()

    def views(self, device: torch.device, specs) -> list[torch.Tensor]:
        """One contiguous tensor on ``device`` (a torch.device with its index, e.g. ``x.device``) per
        ``(shape, dtype)`` of ``specs``, each starting on a 256-byte
        boundary of the buffer; the buffer grows (one allocation) when it is too small or on another
        device. The views alias the previous call's: their contents are undefined. Repeating the last
        call's specs returns its views (no tensor operations: this runs on every layer call)."""
        key = (device, tuple(specs))
        if key == self._last[0]:
            return self._last[1]
        offsets, total = [], 0
        for shape, dtype in specs:
            offsets.append(total)
            nbytes = _numel(shape) * dtype.itemsize
            total += -(-nbytes // _ALIGN) * _ALIGN
        buf = self._buf
        if buf is None or buf.device != device or buf.numel() < total:
            buf = self._buf = torch.empty(max(total, _ALIGN), dtype=torch.uint8, device=device)
        out = []
        for (shape, dtype), off in zip(specs, offsets):
            size = _numel(shape) * dtype.itemsize
            out.append(buf[off:off + size].view(dtype).view(shape))
        self._last = (key, out)
        return out

    def __repr__(self) -> str:
        where = "unallocated" if self._buf is None else f"{self.nbytes} bytes on {self._buf.device}"
        return f"Workspace({where})"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
