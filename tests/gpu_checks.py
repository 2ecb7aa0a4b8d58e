"""Helpers of the GPU tests: the sm_90 skip mark and the error measure every kernel check uses."""

from __future__ import annotations

import pytest
import torch

needs_sm90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9), reason="needs an sm_90 GPU"
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref``; fails on NaN/inf in ``out`` (outputs are
    poisoned before each run, so unwritten elements show up here)."""
    assert torch.isfinite(out.float()).all(), "NaN/inf in the output (unwritten or poisoned elements)"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
