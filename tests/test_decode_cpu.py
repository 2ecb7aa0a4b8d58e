"""CPU-only: the decode path's launch-shape choice and shared-memory sizing (cute_moe.decode)."""

from __future__ import annotations

import pytest

from cute_moe import decode
from cute_moe.shapes import GPT_OSS_120B, QWEN3_30B_A3B, REFERENCE_SHAPES

_SMEM = 227 * 1024


def _pick(shape, tokens=1, sms=132):
    rows = max(tokens * shape.hidden, tokens * shape.top_k * shape.intermediate) * 2
    return decode.pick_config(sms, min(tokens * shape.top_k, shape.num_experts), shape.hidden, shape.intermediate,
                              _SMEM - decode.DecodeConfig().static_smem_bytes() - rows)


def test_imbalance():
    assert decode._imbalance(100, 100) == 1.0
    assert decode._imbalance(50, 100) == 1.0  # idle workers cost nothing
    assert decode._imbalance(150, 100) == pytest.approx(2 / 1.5)


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=lambda s: s.name)
def test_pick_config_fits_and_keeps_whole_units_even(shape):
    cfg = _pick(shape)
    assert cfg is not None and cfg.warps in decode.WARP_CHOICES
    rows = max(shape.hidden, shape.top_k * shape.intermediate) * 2
    assert cfg.ring_bytes() + rows + cfg.static_smem_bytes() <= _SMEM
    workers = 132 * cfg.warps
    for units in (shape.top_k * shape.intermediate, shape.hidden):  # GEMM1 pairs, GEMM2 columns
        assert decode._imbalance(units, workers) <= 1.1


def test_pick_config_examples():
    """GPT-OSS: 2880 GEMM2 columns on 132 SMs: 22 warps give each warp at most one (16 give two to
    some); Qwen3 keeps 16 (equally even, measured faster)."""
    assert _pick(GPT_OSS_120B).warps == 22
    assert _pick(QWEN3_30B_A3B).warps == 16


def test_pick_config_none_when_rows_do_not_fit():
    assert decode.pick_config(132, 8, 4096, 14336, 16 * 1024) is None


def test_smem_bytes_counts_rings_and_the_larger_row_set():
    cfg = decode.DecodeConfig(16, 1024, 4)
    assert cfg.ring_bytes() == 16 * 4 * 2 * 1024
    assert decode.smem_bytes(1, 8, 2048, 768, 2, cfg) == cfg.ring_bytes() + 8 * 768 * 2
    assert decode.smem_bytes(2, 2, 4096, 64, 2, cfg) == cfg.ring_bytes() + 2 * 4096 * 2


def test_pick_config_respects_max_warps():
    assert _pick(GPT_OSS_120B).warps == 22
    rows = max(GPT_OSS_120B.hidden, GPT_OSS_120B.top_k * GPT_OSS_120B.intermediate) * 2
    cfg = decode.pick_config(132, 4, GPT_OSS_120B.hidden, GPT_OSS_120B.intermediate, _SMEM - 4096 - rows,
                             decode.max_warps(8))
    assert cfg.warps <= 20


_DEEPSEEK_ROUTE = (256, 2, "sigmoid", 0, 8, 4, True)


@pytest.mark.parametrize("warps,tokens,route", [(24, 4, None), (20, 8, None), (16, 8, None), (12, 1, None),
                                                (24, 4, _DEEPSEEK_ROUTE), (20, 8, _DEEPSEEK_ROUTE),
                                                (24, 2, (128, 0, "softmax", None, 0, 0, True))])
def test_kernel_does_not_spill_in_the_launch_shapes_pick_config_allows(warps, tokens, route, tmp_path):
    """The decode kernel (with and without its routing phase) cross-compiled for sm_90 (NVRTC, no GPU)
    at the edges of what pick_config may choose (max_warps by token count): no local-memory loads or
    stores in the SASS."""
    pytest.importorskip("cuda.bindings.nvrtc")
    import subprocess

    from cute_moe import _nvrtc
    from cute_moe.inspect import nvdisasm_path

    assert warps <= decode.max_warps(decode._tmax(tokens))
    defines = decode._defines(2, 0, 2, 2, 2, True, 8, decode._tmax(tokens), 2, decode.DecodeConfig(warps), route)
    cubin, _ = _nvrtc.compile_source("moe_decode.cu", "sm_90", dict(defines), cache=False)
    path = tmp_path / "moe_decode.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([nvdisasm_path(), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    assert "HFMA2" in sass or "FFMA" in sass  # the disassembly is real
    assert "LDL" not in sass and "STL" not in sass


def test_precompile_requests_the_kernels_fused_moe_decode_launches(monkeypatch):
    """cute_moe.warmup's decode step asks _launch for the same keys a call of each small T would."""
    import torch

    launched, checked = [], []
    monkeypatch.setattr(decode, "_launch", lambda *args: launched.append(args))
    monkeypatch.setattr(decode, "_shape_reason", lambda *args: checked.append(args) or (None if args[1] <= 1 else "x"))
    monkeypatch.setattr(decode, "MAX_TOKENS", 2)
    taken = decode.precompile(0, torch.bfloat16, 8, 128, 2048, 768, "swiglu_oai", w1_bias=torch.bfloat16)
    assert taken == 1 and [c[1] for c in checked] == [1, 2]
    (args,) = launched
    bf16, f32 = decode.DTYPE_CODES[torch.bfloat16], decode.DTYPE_CODES[torch.float32]
    assert args == (0, (bf16, f32, None, bf16, None, False), 1, 8, 128, 2048, 768, 2, decode.ACTIVATION_CODES["swiglu_oai"],
                    decode.CONFIG, None)


def test_route_spec_takes_the_routing_configurations_the_kernel_routes():
    """route_spec: the kernel routes E <= 1024, top_k <= 32 and groups of a multiple of 32 experts
    (DeepSeek-V3's 8 x 32); other configurations get a reason (they route in their own kernel)."""
    import torch

    deepseek = decode.route_spec(256, torch.bfloat16, 8, "sigmoid", True, 8, 4, torch.float32)
    assert deepseek == (256, decode.DTYPE_CODES[torch.bfloat16], "sigmoid", decode.DTYPE_CODES[torch.float32], 8, 4,
                        True)
    assert decode.route_spec(128, torch.float32, 8, "softmax", False, None, None, None)[4:] == (0, 0, False)
    assert isinstance(decode.route_spec(64, torch.bfloat16, 4, "sigmoid", True, 8, 3, None), str)  # groups of 8
    assert isinstance(decode.route_spec(2048, torch.bfloat16, 8, "softmax", True, None, None, None), str)
    assert decode.logit_slices(132 * 16, 128, 2048) == 8 and decode.logit_slices(132 * 16, 8, 4096) == 16
    assert decode.logit_slices(132 * 16, 1024, 7168) == 2


def test_warmup_specs_carry_the_router_weight_dtypes_the_routed_kernel_is_compiled_for():
    """warmup precompiles the whole-layer decode kernel per router weight dtype: nn.MoE keeps a
    float32 router weight; a bare MoEShape may be called with a checkpoint's (the model dtype) or that."""
    import torch

    from cute_moe import nn, precompile
    from cute_moe.shapes import QWEN3_30B_A3B

    shape = QWEN3_30B_A3B.scaled(hidden=256, intermediate=64, num_experts=8)
    ((spec, _),) = precompile._layers(shape, dtype=torch.bfloat16, activation="silu", bias=False, routing=None)
    assert spec.router_dtypes == (torch.bfloat16, torch.float32)
    module = nn.MoE(256, 64, 8, 2, dtype=torch.bfloat16)
    ((spec, _),) = precompile._layers(module, dtype=torch.bfloat16, activation="silu", bias=False, routing=None)
    assert spec.router_dtypes == (torch.float32,)


def test_cooperative_launch_packs_parameters_and_falls_back_from_pdl(monkeypatch):
    """_nvrtc.launch_cooperative (route_and_plan) and the decode path share CooperativeLaunch: the
    parameters land at their C offsets, the launch is cooperative, and a driver that refuses the PDL
    attribute gets the launch without it (remembered per device). CPU: the driver call is recorded."""
    import ctypes
    from types import SimpleNamespace

    import numpy as np
    import torch

    from cute_moe import _nvrtc

    calls = []

    def driver(cfg_addr, fn_ptr, params_addr, extra):
        cfg = _nvrtc._LaunchConfig.from_address(cfg_addr)
        params = (ctypes.c_void_p * 4).from_address(params_addr)
        values = (ctypes.c_int64.from_address(params[0]).value, ctypes.c_int32.from_address(params[1]).value,
                  ctypes.c_double.from_address(params[2]).value, ctypes.c_int32.from_address(params[3]).value)
        attrs = [cfg.attrs[i].id for i in range(cfg.numAttrs)]
        calls.append((fn_ptr, cfg.gridDimX, cfg.blockDimX, cfg.sharedMemBytes, attrs, values))
        return 1 if _nvrtc._PROGRAMMATIC_STREAM_SERIALIZATION in attrs else 0  # refuses PDL

    monkeypatch.setattr(_nvrtc, "_driver_launch_ex", driver)
    monkeypatch.setattr(_nvrtc, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    monkeypatch.setattr(_nvrtc, "_pdl_devices", {0: True})
    monkeypatch.setattr(_nvrtc, "_coop_pdl", {})
    monkeypatch.setattr(_nvrtc, "_coop_launches", {})
    fn = SimpleNamespace(ptr=1234)
    args = (1 << 40, np.int32(-7), 2.5, np.int32(99))
    assert _nvrtc.launch_cooperative(fn, 0, 132, 512, args, shared_mem=4096)
    assert _nvrtc._coop_pdl == {0: False}
    assert _nvrtc.launch_cooperative(fn, 0, 132, 512, args, shared_mem=4096)
    assert len(_nvrtc._coop_launches) == 1
    coop = _nvrtc._COOPERATIVE
    expected = (1 << 40, -7, 2.5, 99)
    assert calls == [(1234, 132, 512, 4096, [coop, _nvrtc._PROGRAMMATIC_STREAM_SERIALIZATION], expected),
                     (1234, 132, 512, 4096, [coop], expected), (1234, 132, 512, 4096, [coop], expected)]
    assert not _nvrtc.launch_cooperative(fn, 0, 132, 512, (object(),))  # a type the packer does not know


def test_decode_launch_sets_pdl_only_while_capturing(monkeypatch):
    """The decode kernel's CooperativeLaunch (eager_pdl=False) launches eager calls without the PDL
    attribute (host time, no GPU gain) and captured ones with it; an eager launch does not mark the
    device as refusing PDL. CPU: the driver call is recorded."""
    import ctypes
    from types import SimpleNamespace

    import torch

    from cute_moe import _nvrtc

    calls = []

    def driver(cfg_addr, fn_ptr, params_addr, extra):
        cfg = _nvrtc._LaunchConfig.from_address(cfg_addr)
        calls.append([cfg.attrs[i].id for i in range(cfg.numAttrs)])
        return 0

    capturing = [False]
    monkeypatch.setattr(_nvrtc, "_driver_launch_ex", driver)
    monkeypatch.setattr(_nvrtc, "_current_device", lambda: 0)
    monkeypatch.setattr(_nvrtc, "_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    monkeypatch.setattr(_nvrtc, "_pdl_devices", {0: True})
    monkeypatch.setattr(_nvrtc, "_coop_pdl", {})
    launch = _nvrtc.CooperativeLaunch(SimpleNamespace(ptr=1), 0, 132, 512, 0, "qi", eager_pdl=False)
    assert launch(5, 6)
    capturing[0] = True
    assert launch(5, 6)
    coop, pdl = _nvrtc._COOPERATIVE, _nvrtc._PROGRAMMATIC_STREAM_SERIALIZATION
    assert calls == [[coop], [coop, pdl]]
    assert _nvrtc._coop_pdl == {}
