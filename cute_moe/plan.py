"""The token -> expert plan: where each (token, slot) goes in the expert-contiguous row space.

:func:`make_plan` builds a :class:`RoutingPlan` on the GPU with one or two CuPy raw kernels
(``kernels/plan.cu``: a stable counting sort of the flat indices t*k + j by expert), without host
synchronization and with every output sized from shapes alone, so it can be captured in a CUDA
graph. :func:`route_and_plan` routes router logits and builds their plan in one kernel
(``kernels/route_plan.cu``, a cooperative launch whose CTAs meet at a grid barrier), as
``cute_moe.moe`` does. :func:`plan_reference` is the plain-torch definition (CPU or GPU) both are
tested against.

Three row spaces (layouts) are described, each with a ``*_row_src`` (row -> flat index t*k + j, or
-1 for a row that holds no token) and a ``*_token_rows`` [T, k] (flat index -> row, or -1):

- ``"flat"``: ``T*k`` rows, expert e owns rows ``cu_seqlens[e] : cu_seqlens[e+1]``;
- ``"padded"`` (``block_m``): each segment rounded up to a multiple of ``block_m``
  (``padded_cu_seqlens``), in a buffer of fixed capacity ``padded_rows``; ``expert_of_block[b]`` is
  the expert of rows ``b*block_m : (b+1)*block_m`` or -1 past the end (DeepGEMM contiguous layout);
- ``"masked"`` (``max_m``): expert e owns slots ``e*max_m : (e+1)*max_m``, the first ``masked_m[e]``
  used. Callers size ``max_m`` to hold every row; if an expert gets more than ``max_m`` rows the
  rows past ``max_m`` are dropped (token row -1) and ``overflow[0]`` is set to 1 -- an error the
  caller checks when convenient (reading it syncs).

Within a segment rows are in ascending flat index (stable, deterministic). Ids outside [0, E) are
dropped (token row -1, not counted), which serves expert parallelism (-1 = expert on another rank);
then flat rows past ``cu_seqlens[E]`` are -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _nvrtc
from .interop import array_kind, as_torch, to_kind
from .routing import SPECIALIZATION_CASES, defines, launch_route, prepare_route

LAYOUTS = ("flat", "padded", "masked")
MAX_EXPERTS = 1024
_SOURCE = "plan.cu"
_SMEM_BYTES = 48 * 1024
_SINGLE_CTA_MAX_ROWS = 2048  # up to this many (token, slot) pairs one CTA does the whole plan
_MAX_CHUNKS = 128            # above it, at most this many CTAs (each reads all chunk histograms)
_MIN_CHUNK = 1024
_FUSED_SOURCE = "route_plan.cu"
_FUSED_MAX_CTAS = 512        # route_and_plan's grid bound (sizes its histograms in the buffer)
# route_and_plan's launch and its choice against route_gpu + make_plan (fused=None), from a sweep
# on H200 (CUDA-graph replays, the four reference shapes, T = 1 .. 16384): the fused kernel is
# faster at T = 1 (one CTA) and from T = 256 on; in between, the grid barrier costs more than the
# two launches it saves. 4 tokens per CTA was the best minimum (1, 4, 8, 16, 32 tried).
FUSED_TOKENS_PER_CTA = 4       # at least this many tokens per CTA (fewer: more CTAs to sync)
FUSED_MAX_TOKENS_PER_WARP = 4  # auto: above this many tokens per warp (grid capped at what fits), unfused
FUSED_MIN_TOKENS = 256         # auto: fused from this many tokens, or when one CTA routes them all
_fn_cache: dict[tuple, object] = {}


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Routing bookkeeping for ``num_tokens`` tokens, ``top_k`` slots, ``num_experts`` experts.

    All tensors are int32 on the routing device (see the module docstring for the layouts).
    """

    num_tokens: int
    top_k: int
    num_experts: int
    counts: torch.Tensor             # [E] (token, slot) pairs per expert
    cu_seqlens: torch.Tensor         # [E + 1] segment offsets in the flat layout
    row_src: torch.Tensor            # [T*k] flat row -> t*k + j
    token_rows: torch.Tensor         # [T, k] -> flat row
    block_m: int | None = None
    padded_cu_seqlens: torch.Tensor | None = None  # [E + 1]
    padded_row_src: torch.Tensor | None = None     # [padded_rows], -1 = padding
    padded_token_rows: torch.Tensor | None = None  # [T, k]
    expert_of_block: torch.Tensor | None = None    # [padded_rows // block_m], -1 past the end
    max_m: int | None = None
    masked_m: torch.Tensor | None = None           # [E] = min(counts, max_m)
    masked_row_src: torch.Tensor | None = None     # [E, max_m], -1 = empty slot
    masked_token_rows: torch.Tensor | None = None  # [T, k] -> e*max_m + i
    overflow: torch.Tensor | None = None           # [1]: 1 if some expert got more than max_m rows

    @property
    def num_rows(self) -> int:
        """Rows of the flat layout, T*k."""
        return self.num_tokens * self.top_k

    @property
    def padded_rows(self) -> int:
        """Capacity of the padded layout: (T*k + E*(block_m-1)) // block_m * block_m."""
        return padded_capacity(self.num_rows, self.num_experts, self.block_m)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def rows(self, layout: str) -> int:
        """Size of ``layout``'s row space."""
        if layout == "flat":
            return self.num_rows
        self._require(layout)
        return self.padded_rows if layout == "padded" else self.num_experts * self.max_m

    def dest_rows(self, layout: str) -> torch.Tensor:
        """[T, k] row of each (token, slot) in ``layout`` (-1 = dropped)."""
        if layout == "flat":
            return self.token_rows
        self._require(layout)
        return self.padded_token_rows if layout == "padded" else self.masked_token_rows

    def _require(self, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if layout == "padded" and self.block_m is None:
            raise ValueError("layout: 'padded' needs a plan made with block_m")
        if layout == "masked" and self.max_m is None:
            raise ValueError("layout: 'masked' needs a plan made with max_m")


def padded_capacity(num_rows: int, num_experts: int, block_m: int | None) -> int:
    """Rows of the fixed-size padded buffer: enough for any routing, a multiple of block_m."""
    if block_m is None:
        return 0
    return (num_rows + num_experts * (block_m - 1)) // block_m * block_m


def _warps(num_experts: int) -> int:
    """Warps per CTA of plan_scatter such that its shared memory (E * (NW + 2) + 4E + 66 ints at
    most) fits in 48 KiB."""
    return max(1, min(32, (_SMEM_BYTES - 4 * (4 * num_experts + 66)) // (4 * num_experts) - 2))


def _defines(num_experts: int, ids_i64: bool, padded: bool, masked: bool) -> tuple:
    return tuple(sorted(dict(NUM_E=num_experts, NW=_warps(num_experts), IDS_I64=int(ids_i64),
                             HAS_PADDED=int(padded), HAS_MASKED=int(masked)).items()))


def compile_specializations() -> list[tuple[str, dict]]:
    """Representative define sets covering every branch of plan.cu and route_plan.cu (for the CPU
    compile check)."""
    cases = [(8, False, False, False), (256, False, True, True), (128, True, True, False),
             (60, False, False, True), (1024, True, True, True)]
    layouts = [(False, False), (True, True), (True, False), (False, True)]
    fused = [defines(*c, warps=_warps(c[0]), NW=_warps(c[0]), IDS_I64=0, HAS_PADDED=int(p), HAS_MASKED=int(m))
             for c, (p, m) in zip(SPECIALIZATION_CASES, layouts * 4)]
    return [(_SOURCE, dict(_defines(*c))) for c in cases] + [(_FUSED_SOURCE, dict(d)) for d in fused]


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}: expected {lo} <= {name}" + (f" <= {hi}" if hi is not None else "")
                         + f", got {value}")
    return value


def _check_ids(topk_ids, num_experts, block_m, max_m) -> torch.Tensor:
    ids = as_torch(topk_ids, "topk_ids")
    if ids.dim() != 2:
        raise ValueError(f"topk_ids: expected a 2-D [T, k] tensor, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids: expected int32 or int64, got {ids.dtype}")
    if not ids.is_contiguous():
        raise ValueError(f"topk_ids: expected a contiguous tensor, got strides {ids.stride()}")
    _check_sizes(ids.numel(), num_experts, block_m, max_m)
    return ids


def _check_sizes(num_rows: int, num_experts: int, block_m, max_m) -> None:
    """The plan's size arguments for ``num_rows`` = T*k (index math stays below 2**31)."""
    _check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    if block_m is not None:
        _check_int("block_m", block_m, 1)
    if max_m is not None:
        _check_int("max_m", max_m, 1)
        if num_experts * max_m >= 2**31:
            raise ValueError(f"max_m: E * max_m must be < 2**31, got {num_experts} * {max_m}")
    rows = num_rows + num_experts * ((block_m or 1) - 1)
    if rows >= 2**31:
        raise ValueError(f"topk_ids: T*k (+ E*(block_m-1)) must be < 2**31, got {rows}")


def _plan_sizes(n: int, E: int, block_m: int | None, max_m: int | None) -> tuple[list[int], int, int]:
    """(int32 sizes of the plan's tensors, chunk, number of chunks) for n = T*k rows."""
    sizes = [E, E + 1, n, n]
    if block_m is not None:
        prows = padded_capacity(n, E, block_m)
        sizes += [E + 1, prows, n, prows // block_m]
    if max_m is not None:
        sizes += [E, E * max_m, n, 1]
    if n <= _SINGLE_CTA_MAX_ROWS:
        return sizes, n, 1
    threads = 32 * _warps(E)
    chunk = max(-(-n // _MAX_CHUNKS), _MIN_CHUNK)
    chunk = -(-chunk // threads) * threads
    return sizes, chunk, -(-n // chunk)


def plan_buffer_ints(num_rows: int, num_experts: int, *, block_m: int | None = None,
                     max_m: int | None = None) -> int:
    """int32 elements :func:`make_plan` and :func:`route_and_plan` need in ``buffer`` for
    ``num_rows`` = T*k (plan tensors and the per-chunk histograms)."""
    sizes, _, num_chunks = _plan_sizes(num_rows, num_experts, block_m, max_m)
    return _hist_offset(sizes) + max(num_chunks if num_chunks > 1 else 0,
                                     _fused_max_chunks(num_rows, num_experts)) * num_experts


def _hist_offset(sizes: list[int]) -> int:
    """int32 offset of the chunk histograms in the plan buffer: after the plan's tensors, 16-byte
    aligned (route_plan.cu reads them as 16-byte vectors)."""
    return -(-sum(sizes) // 4) * 4


def _fused_max_chunks(num_rows: int, num_experts: int) -> int:
    """An upper bound on route_and_plan's CTAs (>= 1 token each, T <= num_rows); 0 when one CTA."""
    return 0 if num_rows <= 1 else min(_FUSED_MAX_CTAS, num_rows)


def make_plan(topk_ids, num_experts: int, *, block_m: int | None = None, max_m: int | None = None,
              buffer: torch.Tensor | None = None) -> RoutingPlan:
    """Build the :class:`RoutingPlan` of ``topk_ids`` [T, k] (int32/int64, torch or cupy, CUDA) on the
    GPU: flat layout always, padded layout with ``block_m``, masked layout with ``max_m``.
    No host sync; 1 kernel for T*k <= 2048, else 2. ``buffer``: optional contiguous int32 CUDA tensor
    of at least :func:`plan_buffer_ints` elements that the plan's tensors become views of (no
    allocation; see cute_moe.workspace)."""
    ids = _check_ids(topk_ids, num_experts, block_m, max_m)
    if ids.device.type != "cuda":
        raise ValueError(f"topk_ids: expected a CUDA tensor, got device {ids.device} (see plan_reference)")
    return _launch_plan(ids, num_experts, block_m, max_m, buffer)


def _launch_plan(ids: torch.Tensor, E: int, block_m, max_m, buffer) -> RoutingPlan:
    """make_plan after its checks (ids: a checked CUDA [T, k] tensor)."""
    num_tokens, top_k = ids.shape
    n = num_tokens * top_k
    sizes, chunk, num_chunks = _plan_sizes(n, E, block_m, max_m)
    tensors, out_args, hist_ptr = _outputs(ids.device, sizes, num_tokens, top_k, E, block_m, max_m, buffer,
                                           num_chunks if num_chunks > 1 else 0)
    dev = ids.device.index if ids.device.index is not None else torch.cuda.current_device()
    key = (dev, E, ids.dtype == torch.int64, block_m is not None, max_m is not None)
    fns = _fn_cache.get(key)
    if fns is None:
        d = _defines(*key[1:])
        fns = (_nvrtc.get_function(dev, _SOURCE, "plan_count", d),
               _nvrtc.get_function(dev, _SOURCE, "plan_scatter", d), 32 * _warps(E))
        _fn_cache[key] = fns
    count_fn, scatter_fn, threads = fns
    i32 = np.int32
    if num_chunks > 1:
        _nvrtc.launch(count_fn, dev, num_chunks, threads, (ids.data_ptr(), i32(n), i32(chunk), hist_ptr))
    _nvrtc.launch(scatter_fn, dev, num_chunks, threads,
                  (ids.data_ptr(), i32(n), i32(chunk), i32(num_chunks), hist_ptr, *out_args))
    return _assemble(num_tokens, top_k, E, *tensors)


def _outputs(device, sizes: list[int], T: int, k: int, E: int, block_m, max_m, buffer, hist_chunks: int):
    """The plan's tensors (views of ``buffer`` or of a new allocation; ``sizes`` from _plan_sizes),
    their kernel arguments (PLAN_OUT_PARAMS of plan_common.cuh) and the address of room for
    ``hist_chunks`` histograms."""
    n = T * k
    hist_off = _hist_offset(sizes)
    need = hist_off + hist_chunks * E
    if buffer is None:
        buf = torch.empty(need, dtype=torch.int32, device=device)
    else:
        if (buffer.dtype != torch.int32 or buffer.dim() != 1 or not buffer.is_contiguous()
                or buffer.device != device or buffer.numel() < need):
            raise ValueError(f"buffer: expected a contiguous 1-D int32 tensor of >= {need} elements on "
                             f"{device}, got {buffer.dtype} {tuple(buffer.shape)} on {buffer.device}")
        if hist_chunks and buffer.data_ptr() % 16:
            raise ValueError(f"buffer: expected a 16-byte aligned tensor, got address {buffer.data_ptr():#x}")
        buf = buffer
    parts = list(buf.split(sizes + [buf.numel() - sum(sizes)]))[:len(sizes)]  # the rest: histograms
    counts, cu, row_src, token_rows = parts[:4]
    pcu = prow_src = ptoken_rows = eob = mm = mrow_src = mtoken_rows = overflow = None
    if block_m is not None:
        pcu, prow_src, ptoken_rows, eob = parts[4:8]
    if max_m is not None:
        mm, mrow_src, mtoken_rows, overflow = parts[-4:]
    prows = padded_capacity(n, E, block_m)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    i32 = np.int32
    args = (ptr(counts), ptr(cu), ptr(row_src), ptr(token_rows),
            i32(block_m or 1), i32(prows), i32(prows // block_m if block_m else 0), ptr(pcu), ptr(prow_src),
            ptr(ptoken_rows), ptr(eob), i32(max_m or 0), ptr(mm), ptr(mrow_src), ptr(mtoken_rows), ptr(overflow))
    tensors = (counts, cu, row_src, token_rows, block_m, pcu, prow_src, ptoken_rows, eob, max_m, mm, mrow_src,
               mtoken_rows, overflow)
    return tensors, args, buf.data_ptr() + 4 * hist_off if hist_chunks else 0


def route_and_plan(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = False,
                   num_groups: int | None = None, topk_groups: int | None = None, correction_bias=None,
                   routed_scaling_factor: float = 1.0, block_m: int | None = None, max_m: int | None = None,
                   out=None, buffer: torch.Tensor | None = None, fused: bool | None = None,
                   tokens_per_cta: int | None = None):
    """:func:`cute_moe.routing.route_gpu` then :func:`make_plan` of its ids, in one kernel
    (``kernels/route_plan.cu``) where the tokens fit on the GPU at once: (topk_weights, topk_ids,
    RoutingPlan), the same values as the two calls (torch tensors; cupy in, cupy weights and ids).

    Arguments are those of route_gpu and make_plan (E = router_logits.shape[1]). One launch instead
    of three: the tokens are spread over as many CTAs as fit at once (at least ``tokens_per_cta``
    each, default FUSED_TOKENS_PER_CTA; a warp per token), which meet at a grid barrier (a
    cooperative launch) to share their expert counts. ``fused``: None picks (the fused kernel when
    the tokens fit (T < 65536, at most FUSED_MAX_TOKENS_PER_WARP per warp), T is 1 CTA's worth or at
    least FUSED_MIN_TOKENS, and the driver launches it), True requires it (RuntimeError if it
    cannot run), False takes the two calls."""
    kind = array_kind(router_logits)
    r = prepare_route(router_logits, top_k, scoring=scoring, renormalize=renormalize, num_groups=num_groups,
                      topk_groups=topk_groups, correction_bias=correction_bias,
                      routed_scaling_factor=routed_scaling_factor, out=out)
    T, E = r.num_tokens, r.num_experts
    _check_sizes(r.ids.numel(), E, block_m, max_m)
    if tokens_per_cta is not None:
        _check_int("tokens_per_cta", tokens_per_cta, 1)
    if fused is not False and 0 < T < 65536:
        key = ("route_plan", r.device_index, *r.key, block_m is not None, max_m is not None)
        fn = _fn_cache.get(key)
        nw = _warps(E)
        if fn is None:
            d = defines(*r.key, warps=nw, NW=nw, IDS_I64=0, HAS_PADDED=int(block_m is not None),
                        HAS_MASKED=int(max_m is not None))
            fn = _fn_cache[key] = _nvrtc.get_function(r.device_index, _FUSED_SOURCE, "route_plan", d)
        cap = min(_nvrtc.max_resident_blocks(fn, r.device_index, 32 * nw), _FUSED_MAX_CTAS, T)
        per_cta = max(-(-T // cap) if cap else T, tokens_per_cta or FUSED_TOKENS_PER_CTA)
        grid = -(-T // per_cta)
        if fused or (-(-per_cta // nw) <= FUSED_MAX_TOKENS_PER_WARP and (grid == 1 or T >= FUSED_MIN_TOKENS)):
            sizes = _plan_sizes(T * top_k, E, block_m, max_m)[0]
            tensors, out_args, hist_ptr = _outputs(r.weights.device, sizes, T, top_k, E, block_m, max_m, buffer,
                                                   grid if grid > 1 else 0)
            args = (*r.args, np.int32(T), np.int32(per_cta), hist_ptr, *out_args)
            if grid == 1:
                _nvrtc.launch(fn, r.device_index, 1, 32 * nw, args)
                ok = True
            else:
                ok = cap > 0 and _nvrtc.launch_cooperative(fn, r.device_index, grid, 32 * nw, args)
            if ok:
                plan = _assemble(T, top_k, E, *tensors)
                return to_kind(r.weights, kind), to_kind(r.ids, kind), plan
    if fused and T > 0:
        raise RuntimeError(f"route_and_plan: fused=True but the fused kernel cannot run here (T={T}: needs "
                           f"T < 65536 and a cooperative launch through the CUDA driver)")
    launch_route(r)
    plan = _launch_plan(r.ids, E, block_m, max_m, buffer)
    return to_kind(r.weights, kind), to_kind(r.ids, kind), plan


def _assemble(T, k, E, counts, cu, row_src, token_rows, block_m, pcu, prow_src, ptoken_rows, eob,
              max_m, mm, mrow_src, mtoken_rows, overflow) -> RoutingPlan:
    def shape(t, *s):
        return None if t is None else t.view(*s)

    return RoutingPlan(T, k, E, counts, cu, row_src, shape(token_rows, T, k), block_m, pcu, prow_src,
                       shape(ptoken_rows, T, k), eob, max_m, mm, shape(mrow_src, E, max_m or 0),
                       shape(mtoken_rows, T, k), overflow)


def plan_reference(topk_ids, num_experts: int, *, block_m: int | None = None, max_m: int | None = None
                   ) -> RoutingPlan:
    """Plain-torch definition of :func:`make_plan` (CPU or GPU; syncs with the host)."""
    ids = _check_ids(topk_ids, num_experts, block_m, max_m)
    num_tokens, top_k = ids.shape
    E, n, device = num_experts, ids.numel(), ids.device
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    order = torch.sort(torch.where(valid, flat, E), stable=True).indices  # by expert, then flat index
    counts = torch.bincount(flat[valid], minlength=E)
    cu = torch.zeros(E + 1, dtype=torch.long, device=device)
    cu[1:] = counts.cumsum(0)
    nvalid = int(cu[-1])
    src = order[:nvalid]
    expert = flat[src]
    local = torch.arange(nvalid, device=device) - cu[expert]

    def full(size, value=-1):
        return torch.full((size,), value, dtype=torch.long, device=device)

    row_src = full(n)
    row_src[:nvalid] = src
    token_rows = full(n)
    token_rows[src] = torch.arange(nvalid, device=device)
    i32 = torch.int32
    pcu = prow_src = ptoken_rows = eob = mm = mrow_src = mtoken_rows = overflow = None
    if block_m is not None:
        pcounts = (counts + block_m - 1) // block_m * block_m
        pcu = torch.zeros(E + 1, dtype=torch.long, device=device)
        pcu[1:] = pcounts.cumsum(0)
        prows = padded_capacity(n, E, block_m)
        prow = pcu[expert] + local
        prow_src = full(prows)
        prow_src[prow] = src
        ptoken_rows = full(n)
        ptoken_rows[src] = prow
        eob = full(prows // block_m)
        used = torch.repeat_interleave(torch.arange(E, device=device), pcounts // block_m)
        eob[:used.numel()] = used
        pcu, prow_src, ptoken_rows, eob = (t.to(i32) for t in (pcu, prow_src, ptoken_rows, eob))
    if max_m is not None:
        mm = counts.clamp(max=max_m).to(i32)
        keep = local < max_m
        mrow = expert * max_m + local
        mrow_src = full(E * max_m)
        mrow_src[mrow[keep]] = src[keep]
        mtoken_rows = full(n)
        mtoken_rows[src[keep]] = mrow[keep]
        overflow = (counts > max_m).any().to(i32).reshape(1)
        mrow_src, mtoken_rows = mrow_src.to(i32), mtoken_rows.to(i32)
    return _assemble(num_tokens, top_k, E, counts.to(i32), cu.to(i32), row_src.to(i32), token_rows.to(i32),
                     block_m, pcu, prow_src, ptoken_rows, eob, max_m, mm, mrow_src, mtoken_rows, overflow)
