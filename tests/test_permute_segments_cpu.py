"""Row segments of the bf16 permute and the combine kernels (CPU twin of their index math).

With few tokens the kernels cut each row into ``segs`` segments of whole ``step``-vector steps, one
warp each (cute_moe.permute._segments picks ``segs``). Every vector of a row must be handled by
exactly one lane of one segment, for any row length and segment count.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cute_moe import _nvrtc
from cute_moe import permute as pm


def _covered(total: int, segs: int, step: int, unroll: int) -> list[int]:
    """How often each vector of a ``total``-vector row is handled: permute.cu's permute_token (MODE 0,
    step = 32 * unroll) and, with unroll = 1, combine.cu's combine_rows."""
    hits = [0] * total
    seg_len = -(-total // (step * segs)) * step
    for seg in range(segs):
        v_begin = seg * seg_len
        end = min(total, v_begin + seg_len)
        for lane in range(32):
            for v0 in range(v_begin + lane, end, step):
                for u in range(unroll):
                    v = v0 + u * 32
                    if v < end:
                        hits[v] += 1
    return hits


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 3000), segs=st.integers(1, 40), unroll=st.sampled_from([1, 2, 4]))
def test_every_vector_is_handled_once(total, segs, unroll):
    assert _covered(total, segs, 32 * unroll, unroll) == [1] * total


@pytest.mark.parametrize("rows, vectors, step, want", [
    (1, 896, 32, 28),      # DeepSeek-V3 combine at T=1: one warp per 32 vectors
    (1, 896, 192, 5),      # its bf16 permute (UNROLL 6)
    (64, 896, 32, 28),
    (8192, 896, 32, 5),    # enough rows: few segments (132 SMs x 32 CTAs x 8 warps)
    (65536, 896, 32, 1),
    (0, 360, 128, 3),
])
def test_segments_fill_the_grid_then_stop(monkeypatch, rows, vectors, step, want):
    monkeypatch.setattr(_nvrtc, "device_info", lambda dev: ("sm_90", 132))
    assert pm._segments(0, rows, vectors, step) == want
