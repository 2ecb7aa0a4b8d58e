"""CPU-only: every CuPy raw kernel source compiles through NVRTC (no GPU needed), without warnings."""

from __future__ import annotations

import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from cute_moe import _nvrtc  # noqa: E402


def _nvrtc_or_fail():
    try:
        _nvrtc._nvrtc_version()
    except Exception as e:  # the NVRTC shared library is missing
        pytest.fail(f"NVRTC is not loadable ({e}); install it with: pip install 'nvidia-cuda-nvrtc>=13,<14'")


def test_all_kernels_compile_for_sm90():
    _nvrtc_or_fail()
    results = _nvrtc.compile_check("sm_90")
    assert {src for src, _, _ in results} == set(_nvrtc.KERNEL_SOURCES)
    noisy = [(src, d, log) for src, d, log in results if "warning" in log.lower()]
    assert not noisy, noisy


def test_compile_error_is_reported():
    _nvrtc_or_fail()
    with pytest.raises(_nvrtc.CompileError, match="NUM_E"):
        _nvrtc.compile_source("routing.cu", "sm_90", {"TOP_K": 2}, cache=False)  # NUM_E undefined
