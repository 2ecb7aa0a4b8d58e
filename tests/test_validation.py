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
