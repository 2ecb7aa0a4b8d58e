"""Plain-torch reference of the whole MoE forward: the definition every kernel is tested against.

Runs on CPU or GPU. Inputs may be bf16, fp16 or fp32; everything is computed in float32 and results
come back in ``x.dtype``. Two roundings mimic what a kernel pipeline stores between steps:

- the GEMM1 operand is ``x`` (scaled by the router weight first when
  ``apply_router_weight_on_input``) in ``x.dtype``;
- the activation output ``a`` is rounded to ``x.dtype`` before GEMM2, as a bf16 kernel writes it.

GEMM2 outputs, the weighted combine and the shared-expert add stay in float32 until the final cast.
With ``quant=`` (see :mod:`cute_moe.quant`) the fp8 weights are dequantized and both GEMM inputs are
quantized and dequantized in the same scheme, which is what an fp8 w8a8 kernel computes.

NaN anywhere in the inputs propagates: a NaN in ``x`` makes that token's output NaN, a NaN in an
expert's weights makes every token routed to it NaN, and NaN router logits give NaN routing weights
(NaN sorts above every number, so a NaN-scored expert is always selected).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .quant import *  # noqa: F403  (re-exported: the reference defines the fp8 emulation too)
from .quant import QuantizedWeights, dequantize_weight, fake_quantize_act

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "swiglu_oai")
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0

ROUTING_PRESETS: dict[str, dict] = {
    "mixtral": dict(scoring="softmax", renormalize=True),
    "qwen2_moe": dict(scoring="softmax", renormalize=False),
    "qwen3_moe": dict(scoring="softmax", renormalize=True),
    "deepseek_v3": dict(scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4,
                        routed_scaling_factor=2.5),
    "llama4": dict(scoring="sigmoid", renormalize=False),
    "gpt_oss": dict(scoring="softmax", renormalize=True),
}
"""Routing keyword arguments of :func:`route_reference` / ``cute_moe.route`` per model family
(top_k comes from the model config, see :mod:`cute_moe.shapes`):

- Mixtral (HF ``MixtralSparseMoeBlock``): softmax, top-2, renormalized.
- Qwen1.5/Qwen2-MoE: softmax, not renormalized (``norm_topk_prob=False``); Qwen3-MoE renormalizes.
- DeepSeek-V3: sigmoid, plus the checkpoint's ``e_score_correction_bias`` as ``correction_bias``
  (used only to select experts), 8 groups of which the best 4 are kept, renormalized, scaled by 2.5.
- Llama-4: sigmoid, top-1, not renormalized; the weight multiplies the *input* of the expert, so
  also pass ``apply_router_weight_on_input=True`` to ``fused_moe``/``moe``.
- GPT-OSS: top-k on the logits then softmax over those k. Softmax is monotonic and the k-way
  softmax equals the full softmax renormalized over the selected k, so this is mathematically
  identical to softmax + renormalize (up to float32 rounding). Its checkpoints interleave gate/up
  columns; de-interleave w1 into [gate | up] halves when loading.
"""


def route_reference(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                    renormalize: bool = False, num_groups: int | None = None,
                    topk_groups: int | None = None, correction_bias: torch.Tensor | None = None,
                    routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of ``router_logits`` [T, E]: (topk_weights float32 [T, k], topk_ids int32 [T, k]).

    scores = softmax or sigmoid of the logits (float32). Experts are selected on
    ``scores + correction_bias``; with ``num_groups`` the experts form that many contiguous groups,
    each scored by its best selection score (sum of its best two when ``correction_bias`` is given,
    as DeepSeek-V3), and experts outside the best ``topk_groups`` groups are excluded (-inf).
    The top_k experts by selection score are returned in descending order, ties going to the lower
    expert (group) index. Weights are the unbiased scores of the selected experts, divided by their
    sum if ``renormalize``, then multiplied by ``routed_scaling_factor``. See ROUTING_PRESETS.
    """
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    selection = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups:
        selection = _mask_groups(selection, num_groups, topk_groups, biased=correction_bias is not None)
    ids = _stable_topk(selection, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, descending, ties toward the lower index."""
    return values.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _mask_groups(selection: torch.Tensor, num_groups: int, topk_groups: int, *, biased: bool) -> torch.Tensor:
    """Set the selection scores of experts outside the ``topk_groups`` best groups to -inf."""
    grouped = selection.unflatten(-1, (num_groups, -1))
    if biased:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    else:
        group_scores = grouped.amax(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, _stable_topk(group_scores, topk_groups), True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


def gated_activation_reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Gated activation of a GEMM1 output ``h`` [..., 2I] ([gate | up] halves) in float32: [..., I].

    - ``silu``: silu(gate) * up (Mixtral, Qwen, DeepSeek, Llama-4).
    - ``gelu``: gelu(gate) * up with the exact erf GELU (not the tanh approximation).
    - ``swiglu_oai`` (GPT-OSS): gate clamped to <= 7, up to [-7, 7];
      gate * sigmoid(1.702 * gate) * (up + 1).
    """
    gate, up = h.float().chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "swiglu_oai":
        gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
        up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate) * (up + 1)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def combine_reference(y: torch.Tensor, topk_weights: torch.Tensor,
                      shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[t, j] (+ shared_output[t]), float32 accumulation.

    ``y`` [T, k, H] holds each token's expert outputs in slot order; returns [T, H] in ``y.dtype``.
    """
    out = torch.einsum("tkh,tk->th", y.float(), topk_weights.float())
    if shared_output is not None:
        out = out + shared_output.float()
    return out.to(y.dtype)


def experts_reference(x: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor | None,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
                      w1_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                      quant: QuantizedWeights | None = None, apply_router_weight_on_input: bool = False,
                      shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts of ``x`` [T, H]: [T, H] in ``x.dtype`` (see the module docstring for rounding).

    For each token t and slot j with expert e = topk_ids[t, j]: h = x[t] @ w1[e].T (+ w1_bias[e]),
    a = act(h), y = a @ w2[e].T (+ w2_bias[e]); out[t] = sum_j topk_weights[t, j] * y
    (+ shared_output[t]). w1 is [E, 2I, H] ([gate | up] rows), w2 is [E, H, I]. With ``quant`` the
    weights come from it and w1/w2 are None. ``apply_router_weight_on_input`` (Llama-4, top_k == 1)
    scales x by the weight before GEMM1 and combines with weight 1. Loops over experts, so it is
    fast enough for realistic shapes; syncs with the host once (the per-expert row counts).
    """
    num_tokens, k = topk_ids.shape
    w1_of, w2_of, fake_quant = _expert_weights(w1, w2, quant)
    w1_shape, w2_shape = (w1.shape, w2.shape) if quant is None else (quant.w1_q.shape, quant.w2_q.shape)
    num_experts, n1, n2 = w1_shape[0], w1_shape[1], w2_shape[1]
    ids = topk_ids.reshape(-1).long()
    order = ids.argsort(stable=True)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    rows_w = topk_weights.reshape(-1)[order].float().unsqueeze(1)

    gemm1_in = x[order // k].float()
    if apply_router_weight_on_input:
        gemm1_in = (gemm1_in * rows_w).to(x.dtype).float()
    h = _grouped_mm(fake_quant(gemm1_in), w1_of, n1, w1_bias, counts)
    a = gated_activation_reference(h, activation).to(x.dtype).float()
    y_sorted = _grouped_mm(fake_quant(a), w2_of, n2, w2_bias, counts)

    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(num_tokens, k, n2)
    combine_w = torch.ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
    return combine_reference(y, combine_w, shared_output).to(x.dtype)


def _expert_weights(w1, w2, quant) -> tuple[Callable, Callable, Callable]:
    """Per-expert float32 weight getters and the activation fake-quantizer (identity without quant)."""
    if quant is None:
        return (lambda e: w1[e].float()), (lambda e: w2[e].float()), (lambda t: t)

    def getter(q, scale, gated):
        return lambda e: dequantize_weight(q[e:e + 1], scale[e:e + 1], quant.mode, gated=gated)[0]

    return (getter(quant.w1_q, quant.w1_scale, True), getter(quant.w2_q, quant.w2_scale, False),
            lambda t: fake_quantize_act(t, quant.mode))


def _grouped_mm(rows: torch.Tensor, weight_of: Callable, n: int, bias: torch.Tensor | None,
                counts: list[int]) -> torch.Tensor:
    """rows [M, K] sorted by expert (``counts[e]`` rows each) times weight_of(e).T (+ bias[e]): [M, n]."""
    out = rows.new_empty(rows.shape[0], n)
    start = 0
    for e, count in enumerate(counts):
        if count:
            seg = out[start:start + count]
            torch.matmul(rows[start:start + count], weight_of(e).T, out=seg)
            if bias is not None:
                seg += bias[e].float()
            start += count
    return out


_MM_OUT_DTYPE = {"ok": True}


def router_logits_reference(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router logits x [T, H] @ router_weight[E, H].T computed in float32: [T, E] float32.

    On CUDA with bf16/fp16 operands one ``torch.mm(..., out_dtype=float32)`` does it (products of
    16-bit values are exact in float32, accumulation in float32) instead of two casts and a float32
    GEMM: the casts re-read the router weight on every call and cost host time in decode."""
    if (x.is_cuda and x.dtype == router_weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and _MM_OUT_DTYPE["ok"]):
        try:
            return torch.mm(x, router_weight.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=)
            _MM_OUT_DTYPE["ok"] = False
    return x.float() @ router_weight.float().T


def moe_reference(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor | None,
                  w2: torch.Tensor | None, top_k: int, *, scoring: str = "softmax",
                  renormalize: bool = False, num_groups: int | None = None,
                  topk_groups: int | None = None, correction_bias: torch.Tensor | None = None,
                  routed_scaling_factor: float = 1.0, **expert_kwargs) -> torch.Tensor:
    """The whole MoE forward: router logits, :func:`route_reference`, :func:`experts_reference`
    (``expert_kwargs`` are experts_reference's keyword arguments)."""
    weights, ids = route_reference(
        router_logits_reference(x, router_weight), top_k, scoring=scoring, renormalize=renormalize,
        num_groups=num_groups, topk_groups=topk_groups, correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor)
    return experts_reference(x, w1, w2, weights, ids, **expert_kwargs)
