"""CPU-only: tile choice, the prefetch flag of the layer's GEMMs, and the driver launch structs."""

from __future__ import annotations

import ctypes

import pytest
import torch

from cute_moe import _nvrtc
from cute_moe.gemm.config import GemmConfig, pick_config
from cute_moe.gemm.interface import prefetch_weights
from cute_moe.shapes import GPT_OSS_120B, MIXTRAL_8X7B, QWEN3_30B_A3B, REFERENCE_SHAPES


def _tiles(shape, tokens, gated, cfg):
    rows = tokens * shape.top_k
    active = min(shape.num_experts, rows)
    n = shape.intermediate if gated else shape.hidden
    n_tile = cfg.tile_n // 2 if gated else cfg.tile_n
    return active * -(-(rows // active or 1) // cfg.tile_m) * -(-n // n_tile)


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("gated", [True, False])
def test_decode_tiles_fit_one_wave_or_are_widest(shape, gated):
    """T=1: 64-row tiles; the narrowest N tile whose tiles fit in one wave of 132 SMs, else 256 wide."""
    n, k = (2 * shape.intermediate, shape.hidden) if gated else (shape.hidden, shape.intermediate)
    cfg = pick_config(shape.top_k, n, k, shape.num_experts, gated, 132)
    assert cfg.tile_m == 64
    tiles = _tiles(shape, 1, gated, cfg)
    assert tiles <= 132 or cfg.tile_n == 256
    if cfg.tile_n > 64:
        narrower = GemmConfig(64, cfg.tile_n - 32)
        assert _tiles(shape, 1, gated, narrower) > 132


def test_decode_tiles_measured_best():
    """The H200 sweep's fastest T=1 tiles (perf/results/sm90_decode_gemm_sweep, every TILE_N width;
    Mixtral's are within 3% of the fastest)."""
    picks = {(s.name, g): pick_config(s.top_k, 2 * s.intermediate if g else s.hidden,
                                      s.hidden if g else s.intermediate, s.num_experts, g, 132).tile_n
             for s in (MIXTRAL_8X7B, QWEN3_30B_A3B, GPT_OSS_120B) for g in (True, False)}
    assert picks == {("Mixtral-8x7B", True): 256, ("Mixtral-8x7B", False): 64,
                     ("Qwen3-30B-A3B", True): 96, ("Qwen3-30B-A3B", False): 128,
                     ("GPT-OSS-120B", True): 192, ("GPT-OSS-120B", False): 96}


def test_prefetch_only_for_ready_segments_without_clusters():
    assert prefetch_weights(GemmConfig(64, 128), True)
    assert not prefetch_weights(GemmConfig(64, 128), False)
    assert not prefetch_weights(GemmConfig(128, 256, cluster_m=2), True)


def test_layer_gemm_keys_prefetch_weights():
    """The keys warmup compiles are the ones the layer runs: segments ready, so prefetch unless clustered."""
    import cute_moe

    spec = cute_moe.precompile._layers(MIXTRAL_8X7B, dtype=torch.bfloat16, activation="silu", bias=False,
                                       routing={})[0][0]
    for tokens in (1, 8192):
        for key in cute_moe.precompile.gemm_keys(spec, tokens, "sm_90a", 132):
            assert key.prefetch_weights == (key.config.cluster_m == 1), key


def test_launch_structs_match_the_driver_abi():
    """CUlaunchAttribute (id, pad, 64-byte value union) and CUlaunchConfig as cuda.h lays them out."""
    assert ctypes.sizeof(_nvrtc._LaunchAttribute) == 72
    assert _nvrtc._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_nvrtc._LaunchConfig) == 56
    assert (_nvrtc._LaunchConfig.sharedMemBytes.offset, _nvrtc._LaunchConfig.hStream.offset,
            _nvrtc._LaunchConfig.attrs.offset, _nvrtc._LaunchConfig.numAttrs.offset) == (24, 32, 40, 48)
    cfg = _nvrtc._launch_config()
    assert cfg.numAttrs == 1 and cfg.attrs[0].id == 6 and cfg.attrs[0].value == 1  # programmatic serialization
    assert _nvrtc._launch_config() is cfg  # reused per thread


def test_segments_ready_must_be_a_bool():
    from cute_moe.gemm import grouped_gemm

    a, b = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="segments_ready: expected a bool"):
        grouped_gemm(a, b, torch.tensor([0, 2, 4], dtype=torch.int32), segments_ready="yes")


def test_tile_widths():
    """Multiples of 32 from 64 to 256; blockwise fp8 keeps block-aligned halves (64, 128, 256)."""
    from cute_moe.gemm.grouped_gemm_sm90 import GroupedGemmSm90

    assert GemmConfig(64, 96).tile_n == 96 and GemmConfig(128, 224).tile_n == 224
    for bad in (32, 80, 288):
        with pytest.raises(ValueError, match="tile_n must be a multiple of 32"):
            GemmConfig(64, bad)
    with pytest.raises(ValueError, match="tile_n must be 64, 128 or 256"):
        GroupedGemmSm90(GemmConfig(64, 96), "silu", scale_mode="block")
    assert GroupedGemmSm90(GemmConfig(64, 96), "silu").tile_n_out == 48


def test_prefill_tile_width_limits_n_padding():
    from cute_moe.gemm.config import prefill_tile_n

    h, i = GPT_OSS_120B.hidden, GPT_OSS_120B.intermediate
    assert pick_config(16384, h, i, 128, False).tile_n == 224  # GEMM2: 2880 columns, 256 pads 6.7%
    assert pick_config(16384, 2 * i, h, 128, True).tile_n == 256  # GEMM1: 128-column outputs pad 2.2%
    for shape in REFERENCE_SHAPES:
        if shape is not GPT_OSS_120B:
            assert pick_config(8192 * shape.top_k, shape.hidden, shape.intermediate, shape.num_experts,
                               False).tile_n == 256
    assert prefill_tile_n(100, False) == 192  # every width pads > 3%: the least padding (92%)


def test_blockwise_multicast_for_large_experts_only():
    for shape in REFERENCE_SHAPES:
        rows = 8192 * shape.top_k
        cfg = pick_config(rows, shape.hidden, shape.intermediate, shape.num_experts, False, blockwise=True)
        assert (cfg.tile_m, cfg.tile_n) == (128, 128)
        assert cfg.cluster_m == (2 if shape is MIXTRAL_8X7B else 1), shape.name



@pytest.mark.parametrize("blockwise", [False, True])
def test_dynamic_scheduling_below_1024_rows_per_expert(blockwise):
    """Prefill with few M-tiles per expert schedules tiles dynamically (an expert's short last M-tile
    costs less, and the static order would let CTAs drift apart and lose L2 sharing); large experts keep
    the static order and their 2-CTA multicast; decode tiles stay static."""
    for shape in REFERENCE_SHAPES:
        rows = 8192 * shape.top_k
        for gated in (True, False):
            n, k = (2 * shape.intermediate, shape.hidden) if gated else (shape.hidden, shape.intermediate)
            cfg = pick_config(rows, n, k, shape.num_experts, gated, 132, blockwise=blockwise)
            large = rows / shape.num_experts >= 1024
            assert cfg.dynamic != large and cfg.tile_m == 128, (shape.name, gated, cfg)
            assert cfg.cluster_m == (2 if large and (gated or blockwise) else 1)
            assert not pick_config(shape.top_k, n, k, shape.num_experts, gated, 132, blockwise=blockwise).dynamic
    with pytest.raises(ValueError, match="cluster_m=1"):
        GemmConfig(128, 256, cluster_m=2, dynamic=True)


def test_tile_counter_per_stream_and_capture_fallback(monkeypatch):
    """Counter pairs (CPU stand-in for the device buffer): one slot per (device, stream), reused by
    later calls on that stream; under graph capture with no buffer yet the call gets the static order
    (flag 0) and allocates nothing; a buffer made eagerly serves capture streams too."""
    from cute_moe.gemm import interface

    state = {"stream": 1, "capturing": False}
    monkeypatch.setattr(interface, "_COUNTERS", {})
    monkeypatch.setattr(interface, "_COUNTER_SLOT", {})
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: state["stream"], raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *shape, dtype=None, device=None: real_zeros(*shape, dtype=dtype))
    dummy = torch.empty(3, dtype=torch.int32)

    state["capturing"] = True
    pair, on = interface._tile_counter(0, dummy)
    assert pair is dummy and on == 0 and interface._COUNTERS == {}
    state["capturing"] = False
    a, on = interface._tile_counter(0, dummy)
    assert on == 1 and a.shape == (2,) and a.dtype == torch.int32 and not a.any()
    assert interface._tile_counter(0, dummy)[0] is a  # same stream: same pair
    state["stream"] = 2
    b, _ = interface._tile_counter(0, dummy)
    assert b.data_ptr() != a.data_ptr()
    state["stream"], state["capturing"] = 3, True  # a capture stream once the buffer exists
    c, on = interface._tile_counter(0, dummy)
    assert on == 1 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert interface._tile_counter(1, dummy) == (dummy, 0)  # another device, no buffer there yet
    state["capturing"] = False
    d, on = interface._tile_counter(1, dummy)
    assert on == 1 and len(interface._COUNTERS) == 2 and d.data_ptr() not in (a.data_ptr(), b.data_ptr())
