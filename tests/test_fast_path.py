"""The API's per-signature memo of decode launches (api._FAST), on the CPU: meta tensors stand in for
CUDA tensors and the driver, device queries and kernel loading are replaced, so these tests see
which calls re-run the checks and what each launch receives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import cute_moe
from cute_moe import _nvrtc, api, decode, layer, validate

T, E, K, H, I = 1, 64, 4, 256, 128


@pytest.fixture
def gpu(monkeypatch):
    """A fake sm_90 device: launches are recorded (args of each cooperative launch), checks counted."""
    launches, checks = [], []
    monkeypatch.setattr(layer, "_cuda_arch", lambda t: (9, 0))
    monkeypatch.setattr(decode, "_limits", lambda dev: (232448, 9))
    monkeypatch.setattr(_nvrtc, "device_info", lambda index: ("sm_90", 132))
    monkeypatch.setattr(decode, "_function", lambda dev, defines, cfg: SimpleNamespace(ptr=1, defines=dict(defines)))
    monkeypatch.setattr(decode, "MAX_TOKENS", 2)
    decode._launch.cache_clear()
    decode._shape_reason.cache_clear()

    def launch(self, *args):
        launches.append((self.fn.defines, args))
        return True

    monkeypatch.setattr(_nvrtc.CooperativeLaunch, "__call__", launch)
    check_experts = validate.check_experts

    def counted(*args, **kwargs):
        checks.append(1)
        return check_experts(*args, **kwargs)

    monkeypatch.setattr(api, "check_experts", counted)
    monkeypatch.setattr(api, "_FAST", {})
    yield SimpleNamespace(launches=launches, checks=checks)
    decode._launch.cache_clear()
    decode._shape_reason.cache_clear()


def _layer(dtype=torch.bfloat16):
    meta = dict(device="meta", dtype=dtype)
    return (torch.empty(T, H, **meta), torch.empty(E, H, **meta), torch.empty(E, 2 * I, H, **meta),
            torch.empty(E, H, I, **meta))


def test_repeated_moe_call_skips_the_checks_and_launches_the_same_kernel(gpu):
    x, rw, w1, w2 = _layer()
    out = torch.empty_like(x)
    for _ in range(3):
        assert cute_moe.moe(x, rw, w1, w2, K, renormalize=True, out=out, backend="cute") is out
    assert len(gpu.checks) == 1 and len(gpu.launches) == 3
    assert cute_moe.last_backend() == "cute"
    assert gpu.launches[0] == gpu.launches[2] and gpu.launches[0][0]["ROUTE"] == 1


def test_repeated_fused_moe_call_uses_the_memo(gpu):
    x, _, w1, w2 = _layer()
    weights = torch.empty(T, K, device="meta")
    ids = torch.empty(T, K, device="meta", dtype=torch.int32)
    for _ in range(3):
        cute_moe.fused_moe(x, w1, w2, weights, ids, backend="cute")
    assert len(gpu.checks) == 1 and len(gpu.launches) == 3 and gpu.launches[0][0]["ROUTE"] == 0


@pytest.mark.parametrize("change", ["w1_dtype", "w2_shape", "w1_strides", "out_dtype", "top_k"])
def test_a_changed_signature_is_checked_again(gpu, change):
    """Bad arguments after good ones still raise: the memo only answers an identical signature."""
    x, rw, w1, w2 = _layer()
    cute_moe.moe(x, rw, w1, w2, K, backend="cute")
    out, top_k = None, K
    if change == "w1_dtype":
        w1 = w1.to(torch.float16)
    elif change == "w2_shape":
        w2 = torch.empty(E, H, I + 8, device="meta", dtype=torch.bfloat16)
    elif change == "w1_strides":
        w1 = torch.empty(E, H, 2 * I, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    elif change == "out_dtype":
        out = torch.empty(T, H, device="meta", dtype=torch.float16)
    else:
        top_k = E + 1
    with pytest.raises((TypeError, ValueError)):
        cute_moe.moe(x, rw, w1, w2, top_k, out=out, backend="cute")
    assert len(gpu.checks) == 2 and len(gpu.launches) == 1


def test_prefill_sizes_and_debug_checks_skip_the_memo(gpu, monkeypatch):
    x, rw, w1, w2 = _layer()
    big = torch.empty(8, H, device="meta", dtype=torch.bfloat16)
    assert api._decode_switches(big, None, "cute") is None
    assert api._decode_switches(x, None, "reference") is None
    monkeypatch.setattr(validate, "_debug_checks", True)
    assert api._decode_switches(x, None, "cute") is None
    cute_moe.moe(x, rw, w1, w2, K, backend="cute")
    cute_moe.moe(x, rw, w1, w2, K, backend="cute")
    assert len(gpu.checks) == 2 and not api._FAST


def test_switching_the_decode_path_off_takes_the_full_path(gpu, monkeypatch):
    x, rw, w1, w2 = _layer()
    cute_moe.moe(x, rw, w1, w2, K, backend="cute")
    monkeypatch.setattr(decode, "ROUTE_IN_KERNEL", False)
    key_count = len(api._FAST)
    with pytest.raises(Exception):  # the routing kernels need a real GPU here: the full path ran
        cute_moe.moe(x, rw, w1, w2, K, backend="cute")
    assert len(gpu.checks) == 2 and len(api._FAST) == key_count


def test_refused_launch_falls_back_to_the_full_path(gpu, monkeypatch):
    x, rw, w1, w2 = _layer()
    out = torch.empty_like(x)
    cute_moe.moe(x, rw, w1, w2, K, out=out, backend="cute")
    monkeypatch.setattr(_nvrtc.CooperativeLaunch, "__call__", lambda self, *args: False)
    with pytest.raises(Exception):  # the fallback's routing kernels need a real GPU
        cute_moe.moe(x, rw, w1, w2, K, out=out, backend="cute")
    assert len(gpu.checks) == 2


def test_bound_moe_checks_each_signature_once_and_launches_what_moe_launches(gpu):
    """bind_moe: a repeated call checks nothing but x's and out's signature and launches the kernel
    moe's memo holds, with the same parameters; a new signature runs moe's checks once more."""
    x, rw, w1, w2 = _layer()
    out = torch.empty_like(x)
    bound = cute_moe.bind_moe(rw, w1, w2, K, renormalize=True, backend="cute")
    for _ in range(3):
        assert bound(x, out=out) is out
    assert len(gpu.checks) == 1 and len(gpu.launches) == 3 and cute_moe.last_backend() == "cute"
    cute_moe.moe(x, rw, w1, w2, K, renormalize=True, out=out, backend="cute")
    assert gpu.launches[-1] == gpu.launches[0] and gpu.launches[0][0]["ROUTE"] == 1
    x2 = torch.empty(2, H, device="meta", dtype=torch.bfloat16)
    bound(x2)
    bound(x2)
    assert len(gpu.checks) == 2 and len(gpu.launches) == 6


def test_bound_moe_still_rejects_bad_inputs_and_honors_the_switches(gpu, monkeypatch):
    x, rw, w1, w2 = _layer()
    bound = cute_moe.bind_moe(rw, w1, w2, K, backend="cute")
    bound(x)
    with pytest.raises((TypeError, ValueError), match="x"):
        bound(x.to(torch.float16))
    with pytest.raises(ValueError, match="x"):
        bound(torch.empty(T, H + 8, device="meta", dtype=torch.bfloat16))
    monkeypatch.setattr(decode, "ROUTE_IN_KERNEL", False)
    with pytest.raises(Exception):  # the routing kernels need a real GPU here: moe's full path ran
        bound(x)
    assert len(gpu.launches) == 1


def test_bound_moe_on_the_reference_backend_equals_moe():
    """On CPU tensors (the reference backend) a bound call is a moe call."""
    torch.manual_seed(0)
    x, rw = torch.randn(3, H), torch.randn(E, H)
    w1, w2 = torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5
    bound = cute_moe.bind_moe(rw, w1, w2, K, scoring="sigmoid", renormalize=True)
    expected = cute_moe.moe(x, rw, w1, w2, K, scoring="sigmoid", renormalize=True)
    for _ in range(2):
        assert torch.equal(bound(x), expected)
    out = torch.empty_like(x)
    assert bound(x, out=out) is out and torch.equal(out, expected)
