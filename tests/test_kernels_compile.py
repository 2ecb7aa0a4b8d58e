"""CPU-only: every CuPy raw kernel source compiles through NVRTC (no GPU needed), without warnings."""

from __future__ import annotations

from importlib import resources

import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from cute_moe import _nvrtc  # noqa: E402


def _nvrtc_or_fail():
    try:
        _nvrtc._nvrtc_version()
    except Exception as e:  # the NVRTC shared library is missing
        pytest.fail(f"NVRTC is not loadable ({e}); install it with: pip install 'nvidia-cuda-nvrtc>=13,<14'")


def _kernel_files() -> set[str]:
    return {p.name for p in resources.files("cute_moe").joinpath("kernels").iterdir() if p.name.endswith(".cu")}


def test_all_kernels_compile_for_sm90():
    _nvrtc_or_fail()
    results = _nvrtc.compile_check("sm_90")
    assert {src for src, _, _ in results} == _kernel_files()  # every .cu file in the package
    assert set(_nvrtc.KERNEL_SOURCES) <= _kernel_files()
    noisy = [(src, d, log) for src, d, log in results if "warning" in log.lower()]
    assert not noisy, noisy


def test_compile_error_is_reported():
    _nvrtc_or_fail()
    with pytest.raises(_nvrtc.CompileError, match="NUM_E"):
        _nvrtc.compile_source("routing.cu", "sm_90", {"TOP_K": 2}, cache=False)  # NUM_E undefined


def test_fp8_quantize_kernels_compile_for_every_dtype_and_mode():
    """quantize.cu (GEMM2's fp8 input in the fp8 layer) and permute.cu's per-tensor mode."""
    _nvrtc_or_fail()
    from cute_moe.permute import _permute_defines, _quantize_defines

    specs = [("quantize.cu", dict(_quantize_defines(dt, mode))) for dt in (0, 1, 2) for mode in (1, 2, 3)]
    specs += [("permute.cu", dict(_permute_defines(dt, 3, k, 16, pad))) for dt, k, pad in ((2, 8, 0), (1, 1, 2))]
    results = _nvrtc.compile_check("sm_90", specializations=specs)
    assert not [log for _, _, log in results if "warning" in log.lower()]


def test_kernel_cache_keys_on_the_kernel_name(monkeypatch):
    """Two kernels of one source and define set (amax_rows, quantize_rows) must not share a cache
    entry: a per-tensor quantization once launched the amax kernel twice."""
    from cute_moe import permute

    monkeypatch.setattr(permute, "_fn_cache", {})
    monkeypatch.setattr(_nvrtc, "get_function", lambda dev, source, kernel, defines: (source, kernel))
    defines = permute._quantize_defines(2, 3)
    assert permute._get("quantize.cu", "amax_rows", 0, defines) == ("quantize.cu", "amax_rows")
    assert permute._get("quantize.cu", "quantize_rows", 0, defines) == ("quantize.cu", "quantize_rows")
