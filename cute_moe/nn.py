"""``torch.nn.Module`` wrapper of :func:`cute_moe.moe` for inference."""

from __future__ import annotations

import torch

from . import _nvrtc, api
from .api import moe
from .quant import QuantConfig, QuantizedWeights, quantize_weights
from .validate import BACKENDS, check_choice, check_routing
from .reference import ACTIVATIONS

# torch's current device index and raw current stream of a device, without building Python objects
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)


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
    _graph_copy_output = True

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
        # registered even when None (a missing bias): forward reads them straight from the dicts
        for name, t in (("router_weight", router_weight), ("w1", w1), ("w2", w2), ("w1_bias", w1_bias),
                        ("w2_bias", w2_bias)):
            self.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
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

    def cuda_graphs(self, max_tokens: int = 64, copy_output: bool = True) -> "MoE":
        """Serve eager calls of at most ``max_tokens`` tokens from CUDA graphs (decode); 0 turns it off.

        - First call per (tokens, hidden, dtype, device, shared_output dtype): runs eagerly on a side stream
          (compiles kernels), then, if it ran on the cute kernels, captures a graph over static inputs.
        - Later calls: ``cuMemcpyDtoDAsync`` x (and shared_output) in, then ``cuGraphLaunch``, through ctypes
          on torch's current stream: a few driver calls instead of ~8 Python-launched kernels and checks.
        - Non-contiguous or other-device inputs are copied with ``Tensor.copy_``; without the driver, without
          ``raw_cuda_graph_exec`` (torch < 2.6) or with x off the current device, ``graph.replay()`` launches
          (equivalent: torch's replay only adds a device guard and RNG bookkeeping, unused here).
        - ``copy_output=True`` returns a fresh copy of the output; ``False`` returns the graph's output buffer
          itself (no allocation, no copy), overwritten by the next call with the same token count.
        - Replacing a weight tensor (``quantize_``, ``to``, assigning a parameter) rebuilds the graphs (data
          pointers are compared on every call); values copied into weights (``load_state_dict``) are seen.
        - Calls under ``torch.compile``, inside an outer capture, on the CPU or with more tokens run eagerly.

        Returns self."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens: expected an int >= 0, got {max_tokens!r}")
        if not isinstance(copy_output, bool):
            raise ValueError(f"copy_output: expected a bool, got {copy_output!r}")
        self._graph_max_tokens = max_tokens
        self._graph_copy_output = copy_output
        self._graphs: dict = {}
        self._graph_weights: list | None = None
        return self

    def forward(self, x: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output for ``x`` [..., H] (same shape and dtype); ``shared_output`` [..., H] is added."""
        # 2-D x and shared_output are used as they are: a reshape costs a torch dispatch per call
        flat = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        shared = shared_output
        if shared is not None and shared.shape != flat.shape:
            shared = shared.reshape(flat.shape)
        out = None
        rows = flat.shape[0]
        if 0 < rows <= self._graph_max_tokens and isinstance(flat, torch.Tensor) and flat.is_cuda \
                and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
            out = self._replay(flat, shared, rows)
        if out is None:
            out = self._eager(flat, shared)
        return out if x.ndim == 2 else out.reshape(x.shape)

    def _eager(self, flat: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        # weights read from the module's dicts: nn.Module.__getattr__ costs host time on every call
        p = self._parameters
        return moe(flat, p["router_weight"], p["w1"], p["w2"], self.top_k, **self.routing,
                   correction_bias=self._buffers["correction_bias"], activation=self.activation,
                   w1_bias=p["w1_bias"], w2_bias=p["w2_bias"],
                   quant=None if self.quant_mode is None else self.quantized_weights(),
                   apply_router_weight_on_input=self.apply_router_weight_on_input,
                   shared_output=shared, backend=self.backend)

    def _weight_ptrs(self) -> list:
        """Addresses of every weight tensor (read from the module's dicts: attribute lookup through
        nn.Module.__getattr__ would cost more than the graph replay saves) and the quant mode."""
        ptrs = [0 if t is None else t.data_ptr() for t in (*self._parameters.values(), *self._buffers.values())]
        ptrs.append(self.quant_mode)
        return ptrs

    def _replay(self, flat: torch.Tensor, shared: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """The graphed call (see :meth:`cuda_graphs`), or None when this call cannot be graphed."""
        ptrs = self._weight_ptrs()
        if ptrs != self._graph_weights:
            self._graphs, self._graph_weights = {}, ptrs
        device = flat.get_device()
        key = (rows, flat.shape[1], flat.dtype, device, None if shared is None else shared.dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(flat, shared)
        if g is False:
            return None
        if not g.exec_handle or _current_device() != device:
            g.x.copy_(flat)
            if shared is not None:
                g.shared.copy_(shared)
            g.graph.replay()
            return g.out.clone() if self._graph_copy_output else g.out
        stream = _raw_stream(device)
        memcpy = _nvrtc.memcpy_dtod
        if flat.is_contiguous():
            rc = memcpy(g.x_ptr, flat.data_ptr(), g.x_bytes, stream)
            if rc:
                _driver_error(rc, "cuMemcpyDtoDAsync (x)")
        else:
            g.x.copy_(flat)
        if shared is not None:
            if shared.is_contiguous() and shared.get_device() == device:
                rc = memcpy(g.shared_ptr, shared.data_ptr(), g.shared_bytes, stream)
                if rc:
                    _driver_error(rc, "cuMemcpyDtoDAsync (shared_output)")
            else:
                g.shared.copy_(shared)
        rc = _nvrtc.graph_launch(g.exec_handle, stream)
        if rc:
            _driver_error(rc, "cuGraphLaunch")
        if not self._graph_copy_output:
            return g.out
        out = torch.empty_like(g.out)
        rc = memcpy(out.data_ptr(), g.out_ptr, g.out_bytes, stream)
        if rc:
            _driver_error(rc, "cuMemcpyDtoDAsync (output)")
        return out

    def _capture(self, flat: torch.Tensor, shared: torch.Tensor | None):
        """The :class:`_Graph` for this call's key, or False when the layer does not run on the cute
        kernels for it (the reference path syncs with the host)."""
        # contiguous static inputs: replays copy contiguous rows into them byte for byte
        x_static = flat.clone(memory_format=torch.contiguous_format)
        shared_static = None if shared is None else shared.clone(memory_format=torch.contiguous_format)
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
        return _Graph(graph, x_static, shared_static, out_static)

    def extra_repr(self) -> str:
        weight = self.w1 if self.quant_mode is None else self.w1_q
        num_experts, two_inter, hidden = weight.shape
        return (f"hidden={hidden}, intermediate={two_inter // 2}, num_experts={num_experts}, "
                f"top_k={self.top_k}, activation={self.activation!r}, quant={self.quant_mode!r}, "
                f"routing={self.routing}")


class _Graph:
    """One captured call of :meth:`MoE.cuda_graphs`: the graph, its static buffers, their addresses and
    sizes, and the driver handle of the instantiated graph (0: replay through ``graph.replay()``)."""

    __slots__ = ("graph", "exec_handle", "x", "shared", "out", "x_ptr", "shared_ptr", "out_ptr", "x_bytes",
                 "shared_bytes", "out_bytes")

    def __init__(self, graph, x: torch.Tensor, shared: torch.Tensor | None, out: torch.Tensor):
        self.graph, self.x, self.shared, self.out = graph, x, shared, out
        self.x_ptr, self.x_bytes = x.data_ptr(), x.nbytes
        self.out_ptr, self.out_bytes = out.data_ptr(), out.nbytes
        self.shared_ptr = 0 if shared is None else shared.data_ptr()
        self.shared_bytes = 0 if shared is None else shared.nbytes
        self.exec_handle = 0
        raw = getattr(graph, "raw_cuda_graph_exec", None)  # torch >= 2.6
        if raw is not None and _nvrtc.graph_launch is not None and _nvrtc.memcpy_dtod is not None \
                and out.is_contiguous():
            try:
                handle = raw()
            except RuntimeError:  # not instantiated
                handle = 0
            self.exec_handle = handle if isinstance(handle, int) else 0


def _driver_error(rc: int, what: str):
    raise RuntimeError(f"{what} failed with CUresult {rc}")
