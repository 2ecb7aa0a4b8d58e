"""``torch.nn.Module`` wrapper of :func:`cute_moe.moe` for inference."""

from __future__ import annotations

import torch

from . import api
from .api import moe
from .quant import QuantConfig, QuantizedWeights, quantize_weights
from .validate import BACKENDS, check_choice, check_routing
from .reference import ACTIVATIONS


class MoE(torch.nn.Module):
    """A routed-experts MoE layer: router weight [E, H] (kept in float32), w1 [E, 2I, H] ([gate | up]
    rows), w2 [E, H, I], optional biases and DeepSeek-style correction bias, a routing config and
    a gated activation. ``forward(x [..., H])`` calls :func:`cute_moe.moe`. Parameters do not
    require grad: the kernels are forward-only.

    ``MoE(hidden, intermediate, num_experts, top_k, ...)`` draws random weights with std
    1/sqrt(fan_in) (outputs are O(1)); :meth:`from_weights` wraps existing tensors.
    :meth:`cuda_graphs` serves small eager calls (decode) from captured CUDA graphs.
    """

    _graph_max_tokens = 0

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: bool = False, num_groups: int | None = None,
                 topk_groups: int | None = None, routed_scaling_factor: float = 1.0,
                 correction_bias: bool = False, activation: str = "silu", bias: bool = False,
                 apply_router_weight_on_input: bool = False, backend: str = "auto",
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        check_routing(num_experts, torch.device(device or "cpu"), top_k, scoring=scoring,
                      num_groups=num_groups, topk_groups=topk_groups, correction_bias=None)
        self.top_k = top_k
        self.routing = dict(scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                            topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor)
        self.activation = activation
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.backend = backend
        self.quant_mode: str | None = None

        def randn(*shape, fan_in, dtype=dtype):
            return torch.randn(*shape, dtype=dtype, device=device) * fan_in ** -0.5

        def zeros(*shape, dtype=dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self._set_weights(
            randn(num_experts, hidden, fan_in=hidden, dtype=torch.float32),
            randn(num_experts, 2 * intermediate, hidden, fan_in=hidden),
            randn(num_experts, hidden, intermediate, fan_in=intermediate),
            zeros(num_experts, 2 * intermediate) if bias else None,
            zeros(num_experts, hidden) if bias else None,
            zeros(num_experts, dtype=torch.float32) if correction_bias else None)

    @classmethod
    def from_weights(cls, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, top_k: int, *,
                     w1_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                     correction_bias: torch.Tensor | None = None, **config) -> "MoE":
        """Wrap existing weights (not copied, except the router weight which becomes float32);
        ``config`` takes the constructor's routing/activation/backend keywords."""
        num_experts, hidden, inter = w2.shape
        module = cls(hidden, inter, num_experts, top_k, dtype=w1.dtype, device="meta", **config)
        module._set_weights(router_weight.float(), w1, w2, w1_bias, w2_bias, correction_bias)
        return module

    def _set_weights(self, router_weight, w1, w2, w1_bias, w2_bias, correction_bias) -> None:
        def param(t):
            return None if t is None else torch.nn.Parameter(t, requires_grad=False)

        self.router_weight = param(router_weight)
        self.w1, self.w2 = param(w1), param(w2)
        self.w1_bias, self.w2_bias = param(w1_bias), param(w2_bias)
        self.register_buffer("correction_bias", correction_bias)

    def quantize_(self, mode: QuantConfig | str) -> "MoE":
        """Replace w1/w2 by fp8 weights in ``mode``'s scheme (buffers w1_q, w1_scale, w2_q,
        w2_scale); forward then runs the quantized path. Returns self."""
        q = quantize_weights(self.w1, self.w2, mode)
        self.w1 = self.w2 = None
        for name in ("w1_q", "w1_scale", "w2_q", "w2_scale"):
            self.register_buffer(name, getattr(q, name))
        self.quant_mode = q.mode
        return self

    def quantized_weights(self) -> QuantizedWeights | None:
        """The fp8 weights after :meth:`quantize_`, else None."""
        if self.quant_mode is None:
            return None
        return QuantizedWeights(self.w1_q, self.w1_scale, self.w2_q, self.w2_scale, self.quant_mode)

    def cuda_graphs(self, max_tokens: int = 64) -> "MoE":
        """Serve eager calls of at most ``max_tokens`` tokens from CUDA graphs (decode); 0 turns it off.

        The first CUDA call with a given token count (and dtype, device, shared_output or not) runs the
        layer once eagerly on a side stream (compiling what it needs) and, if it ran on the cute
        kernels, captures it into a CUDA graph that reads a static input buffer. Later calls copy x in,
        replay the graph and return a copy of its output: a few host operations instead of about eight
        Python-launched kernels with their argument checks. Graphs are rebuilt when a weight tensor is
        replaced (``quantize_``, ``to``, assigning a parameter); values copied into the existing
        weights (``load_state_dict``) are seen by the graphs. Calls under ``torch.compile``, inside an
        outer graph capture, on the CPU or with more tokens run eagerly. Returns self."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens: expected an int >= 0, got {max_tokens!r}")
        self._graph_max_tokens = max_tokens
        self._graphs: dict = {}
        self._graph_weights: tuple = ()
        return self

    def forward(self, x: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output for ``x`` [..., H] (same shape and dtype); ``shared_output`` [..., H] is added."""
        flat = x.reshape(-1, x.shape[-1])
        shared = None if shared_output is None else shared_output.reshape(flat.shape)
        out = None
        if 0 < flat.shape[0] <= self._graph_max_tokens and isinstance(flat, torch.Tensor) and flat.is_cuda \
                and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
            out = self._replay(flat, shared)
        if out is None:
            out = self._eager(flat, shared)
        return out.reshape(x.shape)

    def _eager(self, flat: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return moe(flat, self.router_weight, self.w1, self.w2, self.top_k, **self.routing,
                   correction_bias=self.correction_bias, activation=self.activation,
                   w1_bias=self.w1_bias, w2_bias=self.w2_bias, quant=self.quantized_weights(),
                   apply_router_weight_on_input=self.apply_router_weight_on_input,
                   shared_output=shared, backend=self.backend)

    def _weight_ptrs(self) -> tuple:
        """Addresses of every weight tensor (read from the module's dicts: attribute lookup through
        nn.Module.__getattr__ would cost more than the graph replay saves)."""
        tensors = (*self._parameters.values(), *self._buffers.values())
        return tuple(0 if t is None else t.data_ptr() for t in tensors) + (self.quant_mode,)

    def _replay(self, flat: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor | None:
        """The graphed call (see :meth:`cuda_graphs`), or None when this call cannot be graphed."""
        ptrs = self._weight_ptrs()
        if ptrs != self._graph_weights:
            self._graphs, self._graph_weights = {}, ptrs
        key = (flat.shape[0], flat.dtype, flat.device, flat.shape[1], shared is not None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(flat, shared)
        if entry is False:
            return None
        graph, x_static, shared_static, out_static = entry
        x_static.copy_(flat)
        if shared_static is not None:
            shared_static.copy_(shared)
        graph.replay()
        return out_static.clone()

    def _capture(self, flat: torch.Tensor, shared: torch.Tensor | None):
        """(graph, static x, static shared_output, static output) for this call's key, or False when
        the layer does not run on the cute kernels for it (the reference path syncs with the host)."""
        x_static = flat.clone()
        shared_static = None if shared is None else shared.clone()
        stream = torch.cuda.current_stream(flat.device)
        side = torch.cuda.Stream(flat.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # compile kernels, initialize cuBLAS, check scales: all outside capture
            self._eager(x_static, shared_static)
            graphable = api.last_backend() == "cute"
        stream.wait_stream(side)
        if not graphable:
            return False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = self._eager(x_static, shared_static)
        return graph, x_static, shared_static, out_static

    def extra_repr(self) -> str:
        weight = self.w1 if self.quant_mode is None else self.w1_q
        num_experts, two_inter, hidden = weight.shape
        return (f"hidden={hidden}, intermediate={two_inter // 2}, num_experts={num_experts}, "
                f"top_k={self.top_k}, activation={self.activation!r}, quant={self.quant_mode!r}, "
                f"routing={self.routing}")
