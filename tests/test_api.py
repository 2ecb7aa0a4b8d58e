"""Public API: results, out=, T=0, NaN, backend selection and the cute hook, nn.MoE, cupy on GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types

import pytest
import torch

import cute_moe
from cute_moe import api
from cute_moe.reference import experts_reference, moe_reference, route_reference

E, K, H, I = 8, 2, 32, 48


def layer(tokens=10, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    router = torch.randn(E, H, generator=g) * H ** -0.5
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return [t.to(device) for t in (x, router, w1, w2)]


def test_route_matches_reference():
    logits = torch.randn(16, E)
    weights, ids = cute_moe.route(logits, K, renormalize=True)
    want_w, want_ids = route_reference(logits, K, renormalize=True)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(weights, want_w) and torch.equal(ids, want_ids)
    assert cute_moe.last_backend() == "reference"


def test_route_presets():
    logits, bias = torch.randn(16, 256), torch.randn(256)
    weights, ids = cute_moe.route(logits, 8, correction_bias=bias, **cute_moe.ROUTING_PRESETS["deepseek_v3"])
    assert ids.shape == (16, 8)
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), 2.5))


@pytest.mark.parametrize("activation", cute_moe.ACTIVATIONS)
def test_fused_moe_matches_reference(activation):
    x, router, w1, w2 = layer()
    weights, ids = cute_moe.route(x.float() @ router.T, K)
    b1, b2, shared = torch.randn(E, 2 * I), torch.randn(E, H).bfloat16(), torch.randn(10, H)
    got = cute_moe.fused_moe(x, w1, w2, weights, ids.long(), activation=activation, w1_bias=b1, w2_bias=b2,
                             shared_output=shared, backend="reference")
    want = experts_reference(x, w1, w2, weights, ids, activation=activation, w1_bias=b1, w2_bias=b2,
                             shared_output=shared)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_moe_matches_reference_and_writes_out():
    x, router, w1, w2 = layer(dtype=torch.float16)
    out = torch.full((10, H), 7.0, dtype=torch.float16)
    result = cute_moe.moe(x, router, w1, w2, K, renormalize=True, activation="gelu", out=out)
    assert result is out
    torch.testing.assert_close(out, moe_reference(x, router, w1, w2, K, renormalize=True, activation="gelu"))
    assert cute_moe.last_backend() == "reference"


def test_fused_moe_out_is_written_in_place():
    x, router, w1, w2 = layer()
    weights, ids = cute_moe.route(x.float() @ router.T, K)
    out = torch.empty(10, H, dtype=torch.bfloat16)
    assert cute_moe.fused_moe(x, w1, w2, weights, ids, out=out) is out
    assert torch.equal(out, cute_moe.fused_moe(x, w1, w2, weights, ids))


def test_router_weight_on_input_top1():
    x, router, w1, w2 = layer()
    got = cute_moe.moe(x, router, w1, w2, 1, **cute_moe.ROUTING_PRESETS["llama4"], apply_router_weight_on_input=True)
    want = moe_reference(x, router, w1, w2, 1, **cute_moe.ROUTING_PRESETS["llama4"],
                         apply_router_weight_on_input=True)
    assert torch.equal(got, want)


def test_zero_tokens():
    x, router, w1, w2 = layer(tokens=0)
    weights, ids = cute_moe.route(torch.randn(0, E), K)
    assert weights.shape == ids.shape == (0, K) and ids.dtype == torch.int32
    assert cute_moe.fused_moe(x, w1, w2, weights, ids).shape == (0, H)
    out = torch.empty(0, H, dtype=torch.bfloat16)
    assert cute_moe.moe(x, router, w1, w2, K, out=out) is out


def test_nan_propagates():
    x, router, w1, w2 = layer()
    x[3, 0] = float("nan")
    out = cute_moe.moe(x, router, w1, w2, K)
    assert out[3].isnan().all() and out[[0, 1, 2, 4]].isfinite().all()
    w2[int(cute_moe.route(x[5:6].float() @ router.T, K)[1][0, 0])] = float("nan")
    assert cute_moe.moe(x, router, w1, w2, K)[5].isnan().all()


def test_cute_backend_on_cpu_says_why():
    x, router, w1, w2 = layer()
    for call in (lambda: cute_moe.moe(x, router, w1, w2, K, backend="cute"),
                 lambda: cute_moe.route(torch.randn(4, E), K, backend="cute")):
        with pytest.raises(NotImplementedError, match="backend='cute' cannot run this call: inputs are on the CPU"):
            call()
    cute_moe.moe(x, router, w1, w2, K, backend="auto")
    assert cute_moe.last_backend() == "reference"


def test_last_backend_is_per_thread():
    cute_moe.route(torch.randn(4, E), K)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cute_moe.last_backend()))
    thread.start()
    thread.join()
    assert seen == [None] and cute_moe.last_backend() == "reference"


class FakeLayer(types.ModuleType):
    """Stands in for cute_moe.layer: records calls and returns empty results on the input device."""

    def __init__(self, reason=None):
        super().__init__("cute_moe.layer")
        self.reason, self.calls = reason, []

    def unsupported_reason(self, op, **kwargs):
        self.calls.append(("unsupported_reason", op, sorted(kwargs)))
        return self.reason

    def logits(self, x, router_weight):
        self.calls.append(("logits",))
        return x.float() @ router_weight.float().T

    def route(self, **kwargs):
        self.calls.append(("route", sorted(kwargs)))
        logits = kwargs["router_logits"]
        shape = (logits.shape[0], kwargs["top_k"])
        return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)

    def fused_moe(self, **kwargs):
        self.calls.append(("fused_moe", sorted(kwargs)))
        return kwargs["out"] if kwargs["out"] is not None else torch.empty_like(kwargs["x"])

    def moe(self, **kwargs):
        self.calls.append(("moe", sorted(kwargs), sorted(kwargs["routing"])))
        return kwargs["out"] if kwargs["out"] is not None else torch.empty_like(kwargs["x"])


ROUTE_KWARGS = sorted(["router_logits", "top_k", "scoring", "renormalize", "num_groups", "topk_groups",
                       "correction_bias", "routed_scaling_factor"])
FUSED_KWARGS = sorted(["x", "w1", "w2", "topk_weights", "topk_ids", "activation", "w1_bias", "w2_bias", "quant",
                       "apply_router_weight_on_input", "shared_output", "out", "workspace"])


def test_auto_picks_cute_when_the_layer_takes_the_call(monkeypatch):
    """Meta tensors are not on the CPU and hold no data: this also proves the whole public path
    (validation and dispatch) never reads tensor values with debug checks off."""
    fake = FakeLayer()
    monkeypatch.setitem(sys.modules, "cute_moe.layer", fake)
    x, router, w1, w2 = layer(device="meta")
    out = cute_moe.moe(x, router, w1, w2, K)
    assert out.device.type == "meta" and out.shape == (10, H)
    assert cute_moe.last_backend() == "cute"
    experts = sorted(set(FUSED_KWARGS) - {"topk_weights", "topk_ids"})
    routing = sorted(set(ROUTE_KWARGS) - {"router_logits"})
    assert fake.calls == [("unsupported_reason", "fused_moe", experts),
                          ("moe", sorted(["router_weight", "routing", *experts]), routing)]


def test_cute_reason_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "cute_moe.layer", FakeLayer("no kernel for fp16 yet"))
    x, router, w1, w2 = layer(device="meta")
    with pytest.raises(NotImplementedError, match="cannot run this call: no kernel for fp16 yet"):
        cute_moe.moe(x, router, w1, w2, K, backend="cute")


def test_missing_layer_module_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cute_moe.layer", None)  # makes the import fail
    monkeypatch.setattr(api, "_layer_missing", None)
    with pytest.raises(NotImplementedError, match="the cute kernels for route are not available in this build"):
        cute_moe.route(torch.randn(4, E, device="meta"), K, backend="cute")


def test_debug_checks_gate_the_id_check_on_the_cute_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "cute_moe.layer", FakeLayer())
    checked = []
    monkeypatch.setattr(api, "check_ids_in_range", lambda ids, n: checked.append(n))
    x, _, w1, w2 = layer(device="meta")
    weights, ids = torch.empty(10, K, device="meta"), torch.empty(10, K, dtype=torch.int32, device="meta")
    cute_moe.fused_moe(x, w1, w2, weights, ids)
    assert checked == []
    monkeypatch.setattr(cute_moe.validate, "_debug_checks", False)
    cute_moe.set_debug_checks(True)
    assert cute_moe.debug_checks_enabled()
    cute_moe.fused_moe(x, w1, w2, weights, ids)
    assert checked == [E]


def test_debug_env_variable():
    code = "import cute_moe; print(cute_moe.debug_checks_enabled())"
    for value, want in (("1", "True"), ("0", "False")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "CUTE_MOE_DEBUG": value})
        assert done.stdout.strip() == want


def test_nn_module():
    x, router, w1, w2 = layer(dtype=torch.float32)
    module = cute_moe.nn.MoE.from_weights(router, w1, w2, K, **cute_moe.ROUTING_PRESETS["mixtral"])
    xs = x.reshape(2, 5, H)
    out = module(xs)
    assert out.shape == xs.shape
    torch.testing.assert_close(out.reshape(10, H), moe_reference(x, router, w1, w2, K, renormalize=True))
    assert module.w1 is not None and not module.w1.requires_grad

    module.quantize_("blockwise")
    assert module.w1 is None and module.w1_q.dtype == torch.float8_e4m3fn
    weights, ids = route_reference(x @ router.T, K, renormalize=True)
    want = experts_reference(x, None, None, weights, ids, quant=module.quantized_weights())
    torch.testing.assert_close(module(xs).reshape(10, H), want)
    assert "quant='blockwise'" in repr(module)


def test_nn_module_random_init():
    torch.manual_seed(0)
    module = cute_moe.nn.MoE(64, 96, 16, 4, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                             correction_bias=True, bias=True, routed_scaling_factor=2.5)
    assert module.w1.dtype == torch.bfloat16 and module.router_weight.dtype == torch.float32
    out = module(torch.randn(8, 64).bfloat16())
    assert out.dtype == torch.bfloat16 and 0.05 < out.float().std() < 20


def test_demo_runs(capsys):
    from cute_moe import demo

    demo.main()
    text = capsys.readouterr().out
    assert "backend: reference" in text and "device: CPU" in text and "relative error" in text


@pytest.mark.gpu
def test_cuda_reference_matches_cpu():
    x, router, w1, w2 = layer(tokens=64)
    cpu = cute_moe.moe(x, router, w1, w2, K, renormalize=True, backend="reference")
    gpu = cute_moe.moe(*(t.cuda() for t in (x, router, w1, w2)), K, renormalize=True, backend="reference")
    assert gpu.is_cuda and cute_moe.last_backend() == "reference"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    x, router, w1, w2 = layer(tokens=16, device="cuda")
    cx, crouter, cw1, cw2 = (cupy.from_dlpack(t) for t in (x, router, w1, w2))
    weights, ids = cute_moe.route(cupy.from_dlpack(x.float() @ router.T), K)
    assert isinstance(weights, cupy.ndarray) and isinstance(ids, cupy.ndarray) and ids.dtype == cupy.int32
    out = cute_moe.fused_moe(cx, cw1, cw2, weights, ids)
    assert isinstance(out, cupy.ndarray)
    want = cute_moe.moe(x, router, w1, w2, K)
    got = cute_moe.moe(cx, crouter, cw1, cw2, K)
    assert isinstance(got, cupy.ndarray) and torch.equal(torch.from_dlpack(got), want)
    target = cupy.from_dlpack(torch.empty_like(x))
    assert cute_moe.moe(cx, crouter, cw1, cw2, K, out=target) is target
    assert torch.equal(torch.from_dlpack(target), want)


def test_nn_moe_cuda_graphs_is_a_no_op_on_the_cpu():
    torch.manual_seed(0)
    layer = cute_moe.nn.MoE(64, 32, 4, 2, renormalize=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = layer(x)
    assert layer.cuda_graphs(8) is layer and torch.equal(layer(x), ref) and layer._graphs == {}
    with pytest.raises(ValueError, match="max_tokens: expected an int >= 0"):
        layer.cuda_graphs(-1)
    with pytest.raises(ValueError, match="copy_output: expected a bool"):
        layer.cuda_graphs(8, copy_output="yes")
    assert layer.cuda_graphs(8, copy_output=False) is layer and torch.equal(layer(x), ref)
    assert torch.equal(layer(x.reshape(1, 3, 64), x.reshape(1, 3, 64)), layer._eager(x, x).reshape(1, 3, 64))
