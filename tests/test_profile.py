"""cute_moe.profile: per-stage CUDA-event times of one MoE call."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe.profiling import STAGES


def test_profile_needs_a_gpu():
    layer = cute_moe.nn.MoE(64, 32, 8, 2)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        cute_moe.profile(layer, torch.randn(3, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("tokens", [8, 2048])
def test_profile_stage_times(tokens, tmp_path, capsys):
    torch.manual_seed(0)
    layer = cute_moe.nn.MoE(1024, 512, 8, 2, renormalize=True, device="cuda")
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    r = cute_moe.profile(layer, x, reps=10, plot=str(tmp_path / "stages.png"))
    assert all(r[s] > 0 for s in STAGES), r
    assert r["sum"] == pytest.approx(sum(r[s] for s in STAGES))
    assert r["call"] / 2 <= r["sum"] <= 2 * r["call"], r
    assert "gemm1" in capsys.readouterr().out
    # the fused_moe form (routing given): no route stage
    w, ids = cute_moe.route(x.float() @ layer.router_weight.T, 2, renormalize=True)
    r2 = cute_moe.profile(x, layer.w1, layer.w2, w, ids, verbose=False)
    assert r2["route"] == 0 and all(r2[s] > 0 for s in STAGES[1:])
