"""Bad-input table: every row must raise the stated exception with a message naming the argument."""

from __future__ import annotations

import pytest
import torch

import cute_moe
from cute_moe.quant import QuantConfig, quantize_weights

T, E, K, H, I = 4, 4, 2, 8, 6
META = torch.device("meta")


def fused_args() -> dict:
    return dict(x=torch.randn(T, H), w1=torch.randn(E, 2 * I, H), w2=torch.randn(E, H, I),
                topk_weights=torch.rand(T, K), topk_ids=torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32))


def call_fused(**over):
    args = fused_args() | over
    positional = [args.pop(n) for n in ("x", "w1", "w2", "topk_weights", "topk_ids")]
    return cute_moe.fused_moe(*positional, **args)


def call_route(**over):
    args = dict(router_logits=torch.randn(T, E), top_k=K) | over
    return cute_moe.route(args.pop("router_logits"), args.pop("top_k"), **args)


def call_moe(**over):
    args = dict(x=torch.randn(T, H), router_weight=torch.randn(E, H), w1=torch.randn(E, 2 * I, H),
                w2=torch.randn(E, H, I), top_k=K) | over
    positional = [args.pop(n) for n in ("x", "router_weight", "w1", "w2", "top_k")]
    return cute_moe.moe(*positional, **args)


def quant(**over):
    q = quantize_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I), "per_token")
    return cute_moe.QuantizedWeights(**(vars(q) | over))


def bad_scale(n, value):
    """A per_token weight scale [E, n, 1] with one bad element."""
    scale = torch.full((E, n, 1), 0.01)
    scale[1, n // 2, 0] = value
    return scale


def ids(*rows):
    return torch.tensor(rows, dtype=torch.int32)


CASES = [
    # (id, call, overrides, exception, argument named in the message)
    ("x rank", call_fused, dict(x=torch.randn(T, H, 1)), ValueError, "x"),
    ("x dtype int", call_fused, dict(x=torch.ones(T, H, dtype=torch.int32)), TypeError, "x"),
    ("x dtype float64", call_fused, dict(x=torch.randn(T, H, dtype=torch.float64)), TypeError, "x"),
    ("x not a tensor", call_fused, dict(x=[[0.0] * H] * T), TypeError, "x"),
    ("x strided", call_fused, dict(x=torch.randn(H, T).T), ValueError, "x"),
    ("w1 rank", call_fused, dict(w1=torch.randn(2 * I, H)), ValueError, "w1"),
    ("w1 H mismatch", call_fused, dict(w1=torch.randn(E, 2 * I, H + 1)), ValueError, "w1"),
    ("w1 odd 2I", call_fused, dict(w1=torch.randn(E, 2 * I - 1, H)), ValueError, "w1"),
    ("w1 dtype differs from x", call_fused, dict(w1=torch.randn(E, 2 * I, H).bfloat16()), TypeError, "w1"),
    ("w1 strided", call_fused, dict(w1=torch.randn(E, H, 2 * I).transpose(1, 2)), ValueError, "w1"),
    ("w2 E mismatch", call_fused, dict(w2=torch.randn(E - 1, H, I)), ValueError, "w2"),
    ("w2 H mismatch", call_fused, dict(w2=torch.randn(E, H + 1, I)), ValueError, "w2"),
    ("w2 I mismatch", call_fused, dict(w2=torch.randn(E, H, I + 1)), ValueError, "w2"),
    ("w2 strided", call_fused, dict(w2=torch.randn(E, I, H).transpose(1, 2)), ValueError, "w2"),
    ("w2 other device", call_fused, dict(w2=torch.randn(E, H, I, device=META)), ValueError, "w2"),
    ("w1_bias shape", call_fused, dict(w1_bias=torch.randn(E, 2 * I - 1)), ValueError, "w1_bias"),
    ("w1_bias dtype", call_fused, dict(w1_bias=torch.ones(E, 2 * I, dtype=torch.int64)), TypeError, "w1_bias"),
    ("w2_bias shape", call_fused, dict(w2_bias=torch.randn(E, H - 1)), ValueError, "w2_bias"),
    ("topk_ids dtype", call_fused, dict(topk_ids=torch.zeros(T, K)), TypeError, "topk_ids"),
    ("topk_ids T mismatch", call_fused, dict(topk_ids=ids([0, 1], [1, 2], [2, 3]),
                                             topk_weights=torch.rand(3, K)), ValueError, "topk_ids"),
    ("topk_ids k > E", call_fused, dict(topk_ids=torch.zeros(T, E + 1, dtype=torch.int32),
                                        topk_weights=torch.rand(T, E + 1)), ValueError, "topk_ids"),
    ("topk_ids >= E", call_fused, dict(topk_ids=ids([0, 1], [1, 2], [2, E], [3, 0])), ValueError, "topk_ids"),
    ("topk_ids < 0", call_fused, dict(topk_ids=ids([0, 1], [1, -1], [2, 3], [3, 0])), ValueError, "topk_ids"),
    ("topk_weights shape", call_fused, dict(topk_weights=torch.rand(T, K + 1)), ValueError, "topk_weights"),
    ("topk_weights dtype", call_fused, dict(topk_weights=torch.rand(T, K, dtype=torch.float64)), TypeError,
     "topk_weights"),
    ("topk_weights other device", call_fused, dict(topk_weights=torch.rand(T, K, device=META)), ValueError,
     "topk_weights"),
    ("activation", call_fused, dict(activation="relu"), ValueError, "activation"),
    ("backend", call_fused, dict(backend="triton"), ValueError, "backend"),
    ("out shape", call_fused, dict(out=torch.empty(T, H + 1)), ValueError, "out"),
    ("out dtype", call_fused, dict(out=torch.empty(T, H, dtype=torch.bfloat16)), TypeError, "out"),
    ("out other device", call_fused, dict(out=torch.empty(T, H, device=META)), ValueError, "out"),
    ("shared_output shape", call_fused, dict(shared_output=torch.randn(T + 1, H)), ValueError, "shared_output"),
    ("weight on input needs top_k 1", call_fused, dict(apply_router_weight_on_input=True), ValueError,
     "apply_router_weight_on_input"),
    ("quant type", call_fused, dict(w1=None, w2=None, quant=QuantConfig("per_token")), TypeError, "quant"),
    ("quant with w1", call_fused, dict(w2=None, quant=quant()), ValueError, "w1"),
    ("quant scale shape", call_fused, dict(w1=None, w2=None, quant=quant(w1_scale=torch.ones(E, 1, 1))),
     ValueError, "quant.w1_scale"),
    ("quant weight dtype", call_fused, dict(w1=None, w2=None, quant=quant(w2_q=torch.randn(E, H, I))),
     TypeError, "quant.w2_q"),
    ("quant mode", call_fused, dict(w1=None, w2=None, quant=quant(mode="int8")), ValueError, "quant.mode"),
    ("quant NaN w1 scale", call_fused, dict(w1=None, w2=None, quant=quant(w1_scale=bad_scale(2 * I, float("nan")))),
     ValueError, "quant.w1_scale"),
    ("quant inf w2 scale", call_fused, dict(w1=None, w2=None, quant=quant(w2_scale=bad_scale(H, float("inf")))),
     ValueError, "quant.w2_scale"),
    ("quant zero scale", call_fused, dict(w1=None, w2=None, quant=quant(w1_scale=bad_scale(2 * I, 0.0))),
     ValueError, "quant.w1_scale"),
    ("quant negative scale", call_moe, dict(w1=None, w2=None, quant=quant(w2_scale=bad_scale(H, -1.0))),
     ValueError, "quant.w2_scale"),
    ("router_logits rank", call_route, dict(router_logits=torch.randn(T * E)), ValueError, "router_logits"),
    ("router_logits dtype", call_route, dict(router_logits=torch.ones(T, E, dtype=torch.int64)), TypeError,
     "router_logits"),
    ("top_k 0", call_route, dict(top_k=0), ValueError, "top_k"),
    ("top_k > E", call_route, dict(top_k=E + 1), ValueError, "top_k"),
    ("top_k not int", call_route, dict(top_k=2.0), TypeError, "top_k"),
    ("scoring", call_route, dict(scoring="tanh"), ValueError, "scoring"),
    ("route backend", call_route, dict(backend="gpu"), ValueError, "backend"),
    ("num_groups not dividing E", call_route, dict(num_groups=3, topk_groups=1), ValueError, "num_groups"),
    ("topk_groups > num_groups", call_route, dict(num_groups=2, topk_groups=3), ValueError, "topk_groups"),
    ("num_groups without topk_groups", call_route, dict(num_groups=2), ValueError, "topk_groups"),
    ("topk_groups without num_groups", call_route, dict(topk_groups=1), ValueError, "topk_groups"),
    ("top_k > experts in kept groups", call_route, dict(top_k=3, num_groups=2, topk_groups=1), ValueError,
     "top_k"),
    ("correction_bias shape", call_route, dict(correction_bias=torch.zeros(E + 1)), ValueError,
     "correction_bias"),
    ("correction_bias other device", call_route, dict(correction_bias=torch.zeros(E, device=META)), ValueError,
     "correction_bias"),
    ("router_weight E mismatch", call_moe, dict(router_weight=torch.randn(E - 1, H)), ValueError,
     "router_weight"),
    ("router_weight H mismatch", call_moe, dict(router_weight=torch.randn(E, H + 1)), ValueError,
     "router_weight"),
    ("router_weight dtype", call_moe, dict(router_weight=torch.ones(E, H, dtype=torch.int32)), TypeError,
     "router_weight"),
    ("moe top_k > E", call_moe, dict(top_k=E + 1), ValueError, "top_k"),
    ("moe correction_bias shape", call_moe, dict(correction_bias=torch.zeros(E - 1)), ValueError,
     "correction_bias"),
    ("moe weight on input needs top_k 1", call_moe, dict(apply_router_weight_on_input=True), ValueError,
     "apply_router_weight_on_input"),
    ("moe activation", call_moe, dict(activation="gelu_tanh"), ValueError, "activation"),
]


@pytest.mark.parametrize("call, overrides, exc, arg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, overrides, exc, arg):
    with pytest.raises(exc) as info:
        call(**overrides)
    message = str(info.value)
    assert message.startswith(f"{arg}:"), message
    assert "expected" in message and "got" in message, message


@pytest.mark.parametrize("call", [call_fused, call_route, call_moe])
def test_base_arguments_are_valid(call):
    call()


def test_module_config_is_checked_at_construction():
    with pytest.raises(ValueError, match="^activation:"):
        cute_moe.nn.MoE(8, 6, 4, 2, activation="relu")
    with pytest.raises(ValueError, match="^num_groups:"):
        cute_moe.nn.MoE(8, 6, 4, 2, num_groups=3, topk_groups=1)


def test_quant_scales_are_checked_once_per_tensor_version(monkeypatch):
    import cute_moe.quant as q

    calls = []
    real = q.check_scale_values
    monkeypatch.setattr(q, "check_scale_values", lambda name, t: calls.append(name) or real(name, t))
    weights = quant()
    for _ in range(3):
        call_fused(w1=None, w2=None, quant=weights)
    assert calls == ["quant.w1_scale", "quant.w2_scale"]
    rebuilt = cute_moe.QuantizedWeights(**vars(weights))  # a new wrapper (nn.MoE makes one per call)
    call_fused(w1=None, w2=None, quant=rebuilt)
    assert len(calls) == 2
    weights.w2_scale[0, 0, 0] = float("nan")  # in place: the version changes, so it is read again
    with pytest.raises(ValueError, match=r"^quant\.w2_scale: expected finite scales > 0, got nan at index \[0, 0, 0\]"):
        call_fused(w1=None, w2=None, quant=weights)


def test_grouped_gemm_scale_values(monkeypatch):
    """grouped_gemm's scale checks (run before its launch; CPU tensors suffice): b_scale always, once per
    weight tensor version (views of it included); a_scale only with debug checks."""
    import cute_moe.quant as q
    from cute_moe.gemm.interface import _scale_mode

    num_e, n, k, m = 2, 256, 128, 5
    a_scale, weight_scale = torch.ones(m), torch.full((num_e, n, 1), 0.5)
    reads = []
    real = q.check_scale_values
    monkeypatch.setattr("cute_moe.gemm.interface.check_scale_values",
                        lambda name, t: reads.append(name) or real(name, t))
    for _ in range(3):  # a new view per call, as the layer passes [E, N, 1] -> [E, N]
        assert _scale_mode(True, a_scale, weight_scale.squeeze(-1), m, num_e, n, k, True) == "token"
    assert reads == ["b_scale"]
    b_scale = weight_scale.squeeze(-1)
    b_scale[1, 7] = float("inf")  # through a view: the weight's version changes
    with pytest.raises(ValueError, match=r"^b_scale: expected finite scales > 0, got inf at index \[1, 7\]"):
        _scale_mode(True, a_scale, b_scale, m, num_e, n, k, True)
    with pytest.raises(ValueError, match="^b_scale:"):
        _scale_mode(True, torch.ones(1), torch.tensor([1.0, float("nan")]), m, num_e, n, k, False)
    a_scale[3] = float("nan")
    good_b = torch.full((num_e, n), 0.5)
    monkeypatch.setattr(cute_moe.validate, "_debug_checks", False)
    assert _scale_mode(True, a_scale, good_b, m, num_e, n, k, True) == "token"  # per call: debug only
    monkeypatch.setattr(cute_moe.validate, "_debug_checks", True)
    with pytest.raises(ValueError, match=r"^a_scale: expected finite scales > 0, got nan at index \[3\]"):
        _scale_mode(True, a_scale, good_b, m, num_e, n, k, True)


def test_grouped_gemm_per_token_scales_with_one_row():
    """a_scale [1] with b_scale [E, N] is per-token with M = 1, not per-tensor."""
    from cute_moe.gemm.interface import _scale_mode

    assert _scale_mode(True, torch.ones(1), torch.ones(3, 64), 1, 3, 64, 128, False) == "token"
    assert _scale_mode(True, torch.ones(1), torch.ones(3), 1, 3, 64, 128, False) == "tensor"
    assert _scale_mode(True, torch.ones(1), torch.ones(3), 7, 3, 64, 128, False) == "tensor"
