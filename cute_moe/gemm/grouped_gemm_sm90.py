"""Hopper (sm_90a) MoE grouped GEMM in CuTe DSL: C[rows of expert e] = A[rows of e] @ B[e]^T.

A `[M_total, K]` holds every expert's rows back to back; expert e owns rows
`[start_e, start_e + count_e)`, given on the device either by `cu_seqlens[E+1]` (varlen layout:
start = cu[e], count = cu[e+1] - cu[e]) or by `masked_m[E]` (masked layout, A is `[E, max_m, K]`:
start = e * max_m, count = masked_m[e]). B is `[E, N, K]` (K-major), C is `[M_total, N_out]`.

Design:
- warp specialization: warpgroup 0 is the producer (one warp issues TMA loads), one or two consumer
  warpgroups issue WGMMA on a (tile_m x tile_n) fp32 accumulator; setmaxnreg moves registers to them.
- persistent: each CTA walks tiles t = blockIdx.x, + gridDim.x, ... over all experts' tiles, or with
  `GemmConfig.dynamic` draws every tile after its first from a global counter (the producer warp
  draws, a shared-memory ring hands the index to the consumers), so tiles start in list order even
  when their costs differ. The tile list (per expert: ceil(count_e / tile_m) M-tiles x N-tiles, M
  fastest so co-resident CTAs share a weight tile in L2) is prefix-summed once per CTA into shared
  memory from the device offsets: no host sync, any routing, same binary.
- a consumer warpgroup whose 64 rows all lie past its expert's end (dynamic scheduling only) follows
  the pipeline without issuing WGMMA.
- tiles never straddle experts: an M-tile starts at start_e + i * tile_m; its A rows past the expert's
  end belong to the next expert (or are zero-filled past M_total) and are never stored, because the
  output TMA store goes through a "clipped" view of C whose row bound is the expert's end row (see
  `_clipped_store_view`).
- gated epilogue (GEMM1 + activation): the tile loads gate rows [n0, n0 + tile_n/2) and up rows
  [I + n0, ...) of the user's `[E, 2I, H]` weight as two TMA boxes into one B stage, so each thread's
  accumulator holds matching gate and up columns; the activated (tile_m x tile_n/2) result is stored.
- optional per-(expert, column) bias and per-row scale (the router weight) in the epilogue.
"""

from __future__ import annotations

from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.tensor_utils import LayoutEnum

from .._nvrtc import PDL
from .config import GemmConfig

# with dynamic scheduling, consumer warpgroups with no rows in a tile skip its WGMMAs (False: for A/B runs)
SKIP_IDLE_WARPGROUPS = True
# tile indices in flight from the producer warp (which draws them) to the consumer warpgroups
SCHED_STAGES = 2
_SWIGLU_ALPHA = 1.702
_SWIGLU_LIMIT = 7.0


@cute.jit
def _sigmoid(x: Float32) -> Float32:
    return cute.arch.rcp_approx(1.0 + cute.math.exp(-x, fastmath=True))


@cute.jit
def _gated(gate: Float32, up: Float32, activation: cutlass.Constexpr) -> Float32:
    """act(gate) * up for the gated activations of `cute_moe.reference`."""
    out = gate
    if const_expr(activation == "silu"):
        out = gate * _sigmoid(gate) * up
    elif const_expr(activation == "gelu"):
        # exact (erf) GELU, as torch.nn.functional.gelu's default
        out = 0.5 * gate * (1.0 + cute.math.erf(gate * 0.7071067811865476)) * up
    else:  # swiglu_oai
        g = cute.arch.fmin(gate, Float32(_SWIGLU_LIMIT))
        u = cute.arch.fmax(cute.arch.fmin(up, Float32(_SWIGLU_LIMIT)), Float32(-_SWIGLU_LIMIT))
        out = g * _sigmoid(g * _SWIGLU_ALPHA) * (u + 1.0)
    return out


class GroupedGemmSm90:
    """One compiled grouped GEMM: a `GemmConfig`, an epilogue and a segment layout (varlen or masked)."""

    def __init__(
        self,
        config: GemmConfig,
        activation: str = "none",
        has_bias: bool = False,
        has_row_scale: bool = False,
        masked: bool = False,
        scale_mode: str = "none",
        prefetch_weights: bool = False,
    ):
        self.cfg = config
        self.activation = activation
        self.gated = activation != "none"
        self.has_bias = has_bias
        self.has_row_scale = has_row_scale
        self.masked = masked
        self.scale_mode = scale_mode
        if config.overlap_promotion and scale_mode != "block":
            raise ValueError("overlap_promotion: only blockwise fp8 promotes per k-tile")
        if scale_mode == "block" and config.tile_n not in (64, 128, 256):
            raise ValueError(f"blockwise fp8: tile_n must be 64, 128 or 256, got {config.tile_n}")
        if prefetch_weights and config.cluster_m != 1:
            raise ValueError("prefetch_weights: only without clusters (cluster_m=1)")
        # the segments are complete before the previous kernel runs (the layer's plan, two or more
        # launches back): read them and start the weight loads before waiting for that kernel
        self.prefetch = prefetch_weights
        self.acc_dtype = cutlass.Float32
        self.tile_m, self.tile_n = config.tile_m, config.tile_n
        self.cm = config.cluster_m
        self.dynamic = config.dynamic
        self.tile_n_out = self.tile_n // 2 if self.gated else self.tile_n
        self.num_mma_wg = self.tile_m // 64
        self.threads = 128 * (1 + self.num_mma_wg)
        self.num_mma_threads = 128 * self.num_mma_wg
        self.epi_store_warp = 4
        self.epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=self.num_mma_threads)
        self.smem_capacity = utils.get_smem_capacity_in_bytes("sm_90")

    # ------------------------------------------------------------------ host-side (trace time)
    def _setup(self, a_dtype, c_dtype, num_experts: int):
        self.a_dtype = a_dtype
        self.c_dtype = c_dtype
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            a_dtype, a_dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
            self.acc_dtype, (self.num_mma_wg, 1, 1), tiler_mn=(64, self.tile_n),
        )
        # the output-shaped MMA: never issued, only used to partition the activated result
        self.tiled_mma_out = self.tiled_mma
        if const_expr(self.gated):
            self.tiled_mma_out = sm90_utils.make_trivial_tiled_mma(
                a_dtype, a_dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
                self.acc_dtype, (self.num_mma_wg, 1, 1), tiler_mn=(64, self.tile_n_out),
            )
        tile_k = 128 * 8 // a_dtype.width  # one 128-byte swizzle atom
        self.tile_k = tile_k
        self.tile_mnk = (self.tile_m, self.tile_n, tile_k)
        # Store subtiles: outputs of 64 or 128 columns in 64-wide subtiles, both buffered (one or two
        # barrier pairs per tile; measured H100, T=8192: Qwen3 GEMM1 bf16 and blockwise fp8 GEMM1/GEMM2
        # 4-7% faster than 32-wide); wider outputs in four buffers of 32 columns (64-wide subtiles in two
        # buffers made Qwen3's 256-wide GEMM2 7% slower); 16 columns where the output tile is an odd
        # multiple of 16 (tile_n 96, 160, 224 gated).
        if self.tile_n_out in (64, 128):
            self.epi_tile, self.epi_stage = (self.tile_m, 64), 2
        else:
            self.epi_tile = (self.tile_m, min(32 if self.tile_n_out % 32 == 0 else 16, self.tile_n_out))
            self.epi_stage = 4 if self.tile_n_out >= 128 else 2

        a_layout = LayoutEnum.ROW_MAJOR
        b_layout = LayoutEnum.ROW_MAJOR  # (N, K) with K contiguous: K-major for WGMMA
        self.c_layout = LayoutEnum.ROW_MAJOR
        ab_bytes = (self.tile_m + self.tile_n) * tile_k * a_dtype.width // 8
        epi_bytes = self.epi_tile[0] * self.epi_tile[1] * c_dtype.width // 8 * self.epi_stage
        reserve = 1024 + 4 * (num_experts + 1) + 1024
        stages = (self.smem_capacity - reserve - epi_bytes) // ab_bytes
        if self.cfg.stages:
            stages = min(stages, self.cfg.stages)
        self.ab_stage = stages
        self.a_smem_staged = sm90_utils.make_smem_layout_a(a_layout, self.tile_mnk, a_dtype, stages)
        self.b_smem_staged = sm90_utils.make_smem_layout_b(b_layout, self.tile_mnk, a_dtype, stages)
        # B as TMA sees it: one box per stage, or two half-height boxes (gate, up) per stage.
        # With tile_k equal to the swizzle atom width, the two halves of a stage are the two
        # contiguous halves of the full stage layout.
        b_box_n = self.tile_n // 2 if self.gated else self.tile_n
        self.b_box_n = b_box_n
        self.b_tma_staged = sm90_utils.make_smem_layout_b(
            b_layout, (self.tile_m, b_box_n, tile_k), a_dtype, stages * (2 if self.gated else 1)
        )
        self.epi_smem_staged = sm90_utils.make_smem_layout_epi(
            c_dtype, self.c_layout, self.epi_tile, self.epi_stage
        )

    @cute.jit
    def __call__(
        self,
        mA: cute.Tensor,  # (M_total, K)
        mB_enk: cute.Tensor,  # (E, N, K)
        mC: cute.Tensor,  # (M_total, N_out)
        mSeg: cute.Tensor,  # int32 cu_seqlens (E+1,) or masked_m (E,)
        mBias: Optional[cute.Tensor],  # (E, N) or None: N = 2 * N_out when gated
        mRowScale: Optional[cute.Tensor],  # (M_total,) float32 or None
        mSA: Optional[cute.Tensor],  # fp8 A scales: (1,) tensor | (M_total,) token | (ceil(K/128), M_total) block
        mSB: Optional[cute.Tensor],  # fp8 B scales: (E,) tensor | (E, N) channel | (E, ceil(N/128), ceil(K/128)) block
        mSched: cute.Tensor,  # int32 (2,): tile counter and exit counter, zero between launches (dynamic)
        max_m: Int32,  # masked layout: rows per expert slot (ignored for varlen)
        sched_on: Int32,  # dynamic config: 1 draws tiles from mSched, 0 falls back to the static order
        num_sms: cutlass.Constexpr,
        stream,
    ):
        num_experts = cute.size(mB_enk, mode=[0])
        self._setup(mA.element_type, mC.element_type, num_experts)
        n_b = cute.size(mB_enk, mode=[1])
        n_out = cute.size(mC, mode=[1])
        m_total = cute.size(mA, mode=[0])
        # (N, K, E) view of B: the expert is TMA's third coordinate
        mB = cute.make_tensor(mB_enk.iterator, cute.select(mB_enk.layout, mode=[1, 2, 0]))

        tma_a, tma_tensor_a = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mA,
            cute.slice_(self.a_smem_staged, (None, None, 0)), (self.tile_m, self.tile_k),
        )
        tma_b, tma_tensor_b = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SMulticastOp() if self.cm > 1 else cpasync.CopyBulkTensorTileG2SOp(),
            mB, cute.slice_(self.b_tma_staged, (None, None, 0)), (self.b_box_n, self.tile_k),
            num_multicast=self.cm,
        )
        mC_clip = self._clipped_store_view(mC, m_total, n_out)
        tma_c, tma_tensor_c = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), mC_clip,
            cute.slice_(self.epi_smem_staged, (None, None, 0)), self.epi_tile,
        )

        n_tiles = (n_out + self.tile_n_out - 1) // self.tile_n_out
        # an upper bound of the M-tiles over all experts: every tile holds >= 1 row, and each
        # non-empty expert adds at most one partial tile
        m_tiles_ub = (m_total + (self.tile_m - 1) * cutlass.min(num_experts, m_total)) // self.tile_m
        # clusters of cm CTAs take cm consecutive M-tiles of one expert (rounded up per expert)
        cluster_tiles_ub = (m_tiles_ub + (self.cm - 1) * cutlass.min(num_experts, m_total)) // self.cm * n_tiles
        grid_x = cutlass.max(cutlass.min(cluster_tiles_ub, num_sms // self.cm), 1) * self.cm

        @cute.struct
        class SharedStorage:
            pipe_mbar: cute.struct.MemRange[cutlass.Int64, self.ab_stage * 2]
            sched_mbar: cute.struct.MemRange[cutlass.Int64, SCHED_STAGES * 2]
            sched_tile: cute.struct.MemRange[Int32, SCHED_STAGES]
            tile_prefix: cute.struct.MemRange[Int32, num_experts + 1]
            sA: cute.struct.Align[
                cute.struct.MemRange[self.a_dtype, cute.cosize(self.a_smem_staged)], 1024
            ]
            sB: cute.struct.Align[
                cute.struct.MemRange[self.a_dtype, cute.cosize(self.b_smem_staged)], 1024
            ]
            sC: cute.struct.Align[
                cute.struct.MemRange[self.c_dtype, cute.cosize(self.epi_smem_staged)], 1024
            ]

        self.shared_storage = SharedStorage
        self.smem_bytes = SharedStorage.size_in_bytes()
        self.kernel(
            tma_a, tma_tensor_a, tma_b, tma_tensor_b, tma_c, tma_tensor_c,
            mSeg, mBias, mRowScale, mSA, mSB, mSched, max_m, sched_on, n_tiles, n_b,
            self.tiled_mma, self.tiled_mma_out,
            self.a_smem_staged, self.b_smem_staged, self.b_tma_staged, self.epi_smem_staged,
        ).launch(
            grid=[grid_x, 1, 1],
            block=[self.threads, 1, 1],
            cluster=[self.cm, 1, 1],
            min_blocks_per_mp=1,
            stream=stream,
            use_pdl=PDL,
        )

    def _clipped_store_view(self, mC: cute.Tensor, m_total, n_out):
        """A 3-D view `(tile_m, N_out, M_total + tile_m)` of C whose row mode is at most one tile tall.

        Element (m, n, l) is C[l + m - tile_m, n]. A tile whose rows [r0, r0 + tile_m) end past its
        expert's end row `end` is stored at l = end, m = r0 + tile_m - end + i: TMA's bounds check on
        m (< tile_m) then drops exactly the rows >= end. The base pointer sits tile_m rows before C;
        TMA stores only touch in-bound elements, so that address is never written.
        """
        base = cute.domain_offset((-self.tile_m, 0), mC).iterator
        layout = cute.make_layout(
            (self.tile_m, n_out, m_total + self.tile_m),
            stride=(n_out, 1, n_out),
        )
        return cute.make_tensor(base, layout)

    # ------------------------------------------------------------------ device
    @cute.jit
    def _draw_tile(self, mSched: cute.Tensor, sched_on: Int32, t_static: Int32, lane: Int32, num_clusters: Int32):
        """The producer warp's next tile: num_clusters + the counter's old value (lane 0 adds, the warp
        shares it), or ``t_static`` when the launch runs the static order."""
        t = t_static
        if sched_on != 0:
            drawn = Int32(0)
            if lane == 0:
                drawn = cute.arch.atomic_add(mSched.iterator, Int32(1), sem="relaxed", scope="gpu")
            t = cute.arch.shuffle_sync(drawn, 0) + num_clusters
        return t

    @cute.jit
    def _release_counter(self, mSched: cute.Tensor, sched_on: Int32, lane: Int32, num_ctas: Int32):
        """After a CTA's last draw: count it out; the last CTA out zeroes both counters for the next
        launch (every CTA has drawn its final index by then; acq_rel orders their draws before it)."""
        if sched_on != 0:
            if lane == 0:
                out = cute.arch.atomic_add(mSched.iterator + 1, Int32(1), sem="acq_rel", scope="gpu")
                if out == num_ctas - 1:
                    mSched[0] = Int32(0)
                    mSched[1] = Int32(0)

    @cute.jit
    def _publish_tile(self, sched, sTile: cute.Tensor, state, t: Int32, lane: Int32):
        """Producer warp: hand tile index t to the consumer warpgroups."""
        sched.producer_acquire(state)
        if lane == 0:
            sTile[state.index] = t
        sched.producer_commit(state)
        state.advance()
        return state

    @cute.jit
    def _take_tile(self, sched, sTile: cute.Tensor, state):
        """Consumer thread: the next tile index from the producer warp."""
        sched.consumer_wait(state)
        t = sTile[state.index]
        sched.consumer_release(state)
        state.advance()
        return t, state

    @cute.jit
    def _segment(self, mSeg: cute.Tensor, e: Int32, max_m: Int32):
        """(first row, row count) of expert e."""
        start = Int32(0)
        count = Int32(0)
        if const_expr(self.masked):
            start = e * max_m
            count = cutlass.min(mSeg[e], max_m)
        else:
            start = mSeg[e]
            count = mSeg[e + 1] - start
        return start, count

    @cute.jit
    def _tile_coords(self, sPrefix: cute.Tensor, t: Int32, e: Int32, n_tiles: Int32, rank: Int32):
        """(expert, M-tile, N-tile) of cluster tile t; e is the expert of the previous tile (tiles only
        move forward, so the search resumes there). Within an expert, M is fastest."""
        while sPrefix[e + 1] <= t:
            e = e + 1
        m_groups = (sPrefix[e + 1] - sPrefix[e]) // n_tiles
        local = t - sPrefix[e]
        return e, local % m_groups * self.cm + rank, local // m_groups

    @cute.jit
    def _weight_tiles(self, tma_b, mB_tma, sB_tma, e: Int32, n_idx: Int32, n_b, rank: Int32):
        """TMA partitions of expert e's weight tiles for N-tile n_idx: (smem, gate or whole rows, up rows)."""
        mB_e = mB_tma[None, None, e]
        gB0 = cute.local_tile(mB_e, (self.b_box_n, self.tile_k), (n_idx, None))
        tBsB, tBgB0 = cpasync.tma_partition(
            tma_b, rank, cute.make_layout(self.cm), cute.group_modes(sB_tma, 0, 2), cute.group_modes(gB0, 0, 2)
        )
        tBgB1 = tBgB0
        if const_expr(self.gated):
            # up rows start at I = N_b / 2
            gB1 = cute.local_tile(
                cute.domain_offset((n_b // 2, 0), mB_e), (self.b_box_n, self.tile_k), (n_idx, None)
            )
            _, tBgB1 = cpasync.tma_partition(
                tma_b, rank, cute.make_layout(self.cm), cute.group_modes(sB_tma, 0, 2), cute.group_modes(gB1, 0, 2)
            )
        return tBsB, tBgB0, tBgB1

    @cute.jit
    def _load_weights(self, tma_b, tBsB, tBgB0, tBgB1, kt, index, bar, mcast_mask):
        """Issue k-tile kt's weight loads into stage `index` (two half-height boxes when gated)."""
        if const_expr(self.gated):
            cute.copy(tma_b, tBgB0[None, kt], tBsB[None, 2 * index], tma_bar_ptr=bar, mcast_mask=mcast_mask)
            cute.copy(tma_b, tBgB1[None, kt], tBsB[None, 2 * index + 1], tma_bar_ptr=bar, mcast_mask=mcast_mask)
        else:
            cute.copy(tma_b, tBgB0[None, kt], tBsB[None, index], tma_bar_ptr=bar, mcast_mask=mcast_mask)

    @cute.jit
    def _mainloop_blockwise(
        self, acc, tmp, tmp2, tCcAcc, tCrA, tCrB, tiled_mma, mainloop, read_state, release_state, mSA, mSB,
        e, start, count, m_idx, n_idx, k_tiles, num_k_blocks,
    ):
        """fp8 with DeepSeek-V3 block scales: per 128-wide k-tile, WGMMA into a scratch accumulator,
        then acc += scratch * sa[kb, row] * sb[e, n-block, kb] in fp32 (promotion, as DeepGEMM does).

        Serial (default): wait for each k-tile's WGMMA, then promote it; only the other consumer
        warpgroup's WGMMA overlaps the promotion. ``GemmConfig.overlap_promotion``: two scratch
        accumulators (`tmp`, `tmp2`), k-tile kt+1's WGMMA runs while kt is promoted.

        Each thread's accumulator holds two rows (fragment index bit 1: +8 rows) and its columns split
        into two halves (gate/up, or the tile's two column halves) that each sit in one 128-column
        weight block.

        Returns the advanced (read, release) pipeline states: the dynamic k-loop rebinds them in this
        function's scope only, so the caller must take the returned ones (else its next tile re-reads
        stale stages and the pipeline phases drift into a deadlock).
        """
        row0 = m_idx * self.tile_m
        ra = start + cutlass.min(row0 + tCcAcc[0][0], count - 1)
        rb = start + cutlass.min(row0 + tCcAcc[2][0], count - 1)
        nb_max = cute.size(mSB, mode=[1]) - 1
        if const_expr(self.gated):  # gate and up halves are blocked separately (quantize_blockwise_gated_weight)
            nb_lo = n_idx * self.tile_n_out // 128
            nb_hi = (nb_max + 1) // 2 + nb_lo
        else:
            nb_lo = n_idx * self.tile_n // 128
            nb_hi = cutlass.min((n_idx * self.tile_n + self.tile_n // 2) // 128, nb_max)
        acc.fill(0.0)
        last = k_tiles - 1
        # Scales are raw loads one k-tile ahead of their use and only multiplied at promotion: a
        # product formed before the WGMMA issue made ptxas stall the QGMMA sequence on the global load.
        if const_expr(not self.cfg.overlap_promotion):
            s0, s1, s2, s3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, 0)
            for kt in range(k_tiles):
                tiled_mma = self._issue_ktile(tiled_mma, tmp, tCrA, tCrB, mainloop, read_state, num_k_blocks)
                read_state.advance()
                n0, n1, n2, n3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, cutlass.min(kt + 1, last))
                warpgroup.wait_group(0)
                mainloop.consumer_release(release_state)
                release_state.advance()
                self._promote(acc, tmp, s0, s1, s2, s3)
                s0, s1, s2, s3 = n0, n1, n2, n3
        else:
            # Scales are scalars, not tuples (carried through the dynamic loop and if). ptxas waits for
            # both groups before tmp2's promotion after the if/else join (it cannot tell which one is in
            # flight there), so only tmp's promotion overlaps a WGMMA. Measured alternatives (H200, T=8192):
            # tmp2's promotion repeated in both branches moves that wait to the back edge and was no
            # faster; a branch-free body with a group in flight across the back edge makes ptxas serialize
            # every WGMMA; warpgroups taking turns to issue (named barriers) matched serial promotion, and
            # taking turns after each WGMMA completed (one warpgroup's promotion under the other's WGMMA)
            # was 1.3-1.4x slower than serial: one 64-row warpgroup alone does not keep the tensor cores busy.
            a0, a1, a2, a3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, 0)
            b0, b1, b2, b3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, cutlass.min(1, last))
            tiled_mma = self._issue_ktile(tiled_mma, tmp, tCrA, tCrB, mainloop, read_state, num_k_blocks)
            read_state.advance()
            for p in range(k_tiles // 2):  # tmp holds k-tile 2p in flight, tmp2 k-tile 2p + 1
                kt = 2 * p
                tiled_mma = self._issue_ktile(tiled_mma, tmp2, tCrA, tCrB, mainloop, read_state, num_k_blocks)
                read_state.advance()
                warpgroup.wait_group(1)
                mainloop.consumer_release(release_state)
                release_state.advance()
                self._promote(acc, tmp, a0, a1, a2, a3)
                a0, a1, a2, a3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, cutlass.min(kt + 2, last))
                if kt + 2 < k_tiles:
                    tiled_mma = self._issue_ktile(tiled_mma, tmp, tCrA, tCrB, mainloop, read_state, num_k_blocks)
                    read_state.advance()
                    warpgroup.wait_group(1)
                else:
                    warpgroup.wait_group(0)
                mainloop.consumer_release(release_state)
                release_state.advance()
                self._promote(acc, tmp2, b0, b1, b2, b3)
                b0, b1, b2, b3 = self._block_scales(mSA, mSB, e, ra, rb, nb_lo, nb_hi, cutlass.min(kt + 3, last))
            if k_tiles % 2 == 1:  # tmp holds the last k-tile
                warpgroup.wait_group(0)
                mainloop.consumer_release(release_state)
                release_state.advance()
                self._promote(acc, tmp, a0, a1, a2, a3)
        return read_state, release_state

    @cute.jit
    def _mainloop(self, acc, tCrA, tCrB, tiled_mma, mainloop, read_state, release_state, k_tiles, num_k_blocks):
        """bf16 / fp16 / unscaled-block fp8 mainloop: one WGMMA batch in flight, each stage released one
        k-tile after its batch was issued. Returns the advanced (read, release) states (see
        `_mainloop_blockwise`)."""
        tiled_mma.set(warpgroup.Field.ACCUMULATE, False)
        warpgroup.fence()
        mainloop.consumer_wait(read_state)
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, acc, tCrA[None, None, kb, read_state.index],
                      tCrB[None, None, kb, read_state.index], acc)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        read_state.advance()
        for kt in range(1, k_tiles):
            mainloop.consumer_wait(read_state)
            warpgroup.fence()
            for kb in cutlass.range_constexpr(num_k_blocks):
                cute.gemm(tiled_mma, acc, tCrA[None, None, kb, read_state.index],
                          tCrB[None, None, kb, read_state.index], acc)
            warpgroup.commit_group()
            warpgroup.wait_group(1)
            mainloop.consumer_release(release_state)
            release_state.advance()
            read_state.advance()
        warpgroup.wait_group(0)
        mainloop.consumer_release(release_state)
        release_state.advance()
        return read_state, release_state

    @cute.jit
    def _skip_mainloop(self, mainloop, read_state, release_state, k_tiles):
        """A tile's k-tiles without WGMMA: wait for each stage and release it at once. Waiting keeps this
        warpgroup's releases in step with the stage phases (an early release would count toward a
        later phase of the empty barrier)."""
        for kt in range(k_tiles):
            mainloop.consumer_wait(read_state)
            read_state.advance()
            mainloop.consumer_release(release_state)
            release_state.advance()
        return read_state, release_state

    @cute.jit
    def _block_scales(self, mSA, mSB, e, ra, rb, nb_lo, nb_hi, kt):
        """Raw scales of k-tile ``kt`` for a thread's fragment: sa[row a], sa[row b], sb[low-half
        n-block], sb[high-half n-block]."""
        return mSA[kt, ra], mSA[kt, rb], mSB[e, nb_lo, kt], mSB[e, nb_hi, kt]

    @cute.jit
    def _issue_ktile(self, tiled_mma, dst, tCrA, tCrB, mainloop, read_state, num_k_blocks):
        """Wait for ``read_state``'s stage and issue its WGMMAs into ``dst`` (overwritten), one commit group."""
        mainloop.consumer_wait(read_state)
        warpgroup.fence()
        tiled_mma.set(warpgroup.Field.ACCUMULATE, False)
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, dst, tCrA[None, None, kb, read_state.index],
                      tCrB[None, None, kb, read_state.index], dst)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        return tiled_mma

    @cute.jit
    def _promote(self, acc, src, sa0, sa1, sb_lo, sb_hi):
        """acc += src * sa[row] * sb[n-block] per fragment element (bit 1 of the fragment index picks
        the row, the half the n-block)."""
        s00 = sa0 * sb_lo
        s10 = sa1 * sb_lo
        s01 = sa0 * sb_hi
        s11 = sa1 * sb_hi
        half = cute.size(acc) // 2
        for i in cutlass.range_constexpr(half):
            if const_expr((i // 2) % 2 == 0):
                acc[i] = acc[i] + src[i] * s00
                acc[i + half] = acc[i + half] + src[i + half] * s01
            else:
                acc[i] = acc[i] + src[i] * s10
                acc[i + half] = acc[i + half] + src[i + half] * s11

    @cute.kernel
    def kernel(
        self,
        tma_a: cute.CopyAtom,
        mA_tma: cute.Tensor,
        tma_b: cute.CopyAtom,
        mB_tma: cute.Tensor,
        tma_c: cute.CopyAtom,
        mC_tma: cute.Tensor,
        mSeg: cute.Tensor,
        mBias: Optional[cute.Tensor],
        mRowScale: Optional[cute.Tensor],
        mSA: Optional[cute.Tensor],
        mSB: Optional[cute.Tensor],
        mSched: cute.Tensor,
        max_m: Int32,
        sched_on: Int32,
        n_tiles: Int32,
        n_b: Int32,
        tiled_mma: cute.TiledMma,
        tiled_mma_out: cute.TiledMma,
        a_smem_staged: cute.ComposedLayout,
        b_smem_staged: cute.ComposedLayout,
        b_tma_staged: cute.ComposedLayout,
        epi_smem_staged: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        num_experts = cute.size(mB_tma, mode=[2])

        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_a)
            cpasync.prefetch_descriptor(tma_b)
            cpasync.prefetch_descriptor(tma_c)

        smem = utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)

        tma_bytes = cute.size_in_bytes(
            self.a_dtype, cute.slice_(a_smem_staged, (None, None, 0))
        ) + cute.size_in_bytes(self.a_dtype, cute.slice_(b_smem_staged, (None, None, 0)))
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.pipe_mbar.data_ptr(),
            num_stages=self.ab_stage,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            # each consumer warp releases a stage in every CTA that multicast into it
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_mma_wg * 4 * self.cm),
            tx_count=tma_bytes,
            cta_layout_vmnk=cute.make_layout((1, self.cm, 1, 1)),
            defer_sync=True,
        )
        # dynamic scheduling: the producer warp draws each tile index and hands it to the consumers
        sched = sTile = None
        if const_expr(self.dynamic):
            sched = pipeline.PipelineAsync.create(
                barrier_storage=storage.sched_mbar.data_ptr(),
                num_stages=SCHED_STAGES,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 32),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_mma_threads),
                defer_sync=True,
            )
            sTile = storage.sched_tile.get_tensor(cute.make_layout(SCHED_STAGES))
        pipeline_init_arrive(cluster_shape_mn=(self.cm, 1), is_relaxed=True)
        rank = Int32(0)
        if const_expr(self.cm > 1):
            rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        cluster_id = bidx // self.cm
        num_clusters = gdim // self.cm

        # Programmatic dependent launch: everything above overlaps the previous kernel's tail; every
        # global access below waits for it (its outputs: A, the segments, the scales). With prefetch the
        # producer reads the segments and loads the first stages' weights first, the consumers wait below.
        if const_expr(not self.prefetch):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
        # ---- per-CTA tile list: sPrefix[e] = first tile of expert e (in units of output tiles)
        sPrefix = storage.tile_prefix.get_tensor(cute.make_layout(num_experts + 1))
        if warp_idx == 0:
            carry = Int32(0)
            if lane == 0:
                sPrefix[0] = Int32(0)
            for chunk in cutlass.range_constexpr((num_experts + 31) // 32):
                e = chunk * 32 + lane
                x = Int32(0)
                if e < num_experts:
                    _, count = self._segment(mSeg, e, max_m)
                    x = ((count + self.tile_m - 1) // self.tile_m + self.cm - 1) // self.cm * n_tiles
                for s in cutlass.range_constexpr(5):
                    y = cute.arch.shuffle_sync_up(x, 1 << s, mask_and_clamp=0)
                    if lane >= (1 << s):
                        x = x + y
                if e < num_experts:
                    sPrefix[e + 1] = carry + x
                carry = carry + cute.arch.shuffle_sync(x, 31)
        cute.arch.sync_threads()
        pipeline_init_wait(cluster_shape_mn=(self.cm, 1))
        total_tiles = sPrefix[num_experts]

        sA = storage.sA.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        sB = storage.sB.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        sB_tma = storage.sB.get_tensor(b_tma_staged.outer, swizzle=b_tma_staged.inner)
        sC = storage.sC.get_tensor(epi_smem_staged.outer, swizzle=epi_smem_staged.inner)

        k_tiles = cute.size(
            cute.local_tile(mA_tma, (self.tile_m, self.tile_k), (0, None)), mode=[2]
        )
        wg_idx = cute.arch.make_warp_uniform(tidx // 128)

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(40)
            if warp_idx == 0:
                state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stage)
                b_mcast_mask = cutlass.Int16((1 << self.cm) - 1 if self.cm > 1 else 0)
                t = cluster_id
                e = Int32(0)
                sched_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, SCHED_STAGES)
                if const_expr(self.dynamic):  # the first tile is every CTA's own: no counter read
                    sched_state = self._publish_tile(sched, sTile, sched_state, t, lane)
                # prefetch: the first tile's first `pre` stages get their weight tiles before the wait and
                # their A tiles after it (a_state replays those stages' barriers); first is 1 on that tile
                pre = Int32(0)
                first = Int32(1)
                a_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stage)
                if const_expr(self.prefetch):
                    if t < total_tiles:
                        e, m_idx, n_idx = self._tile_coords(sPrefix, t, e, n_tiles, rank)
                        tBsB, tBgB0, tBgB1 = self._weight_tiles(tma_b, mB_tma, sB_tma, e, n_idx, n_b, rank)
                        pre = cutlass.min(k_tiles, self.ab_stage)
                        for kt in range(pre):
                            mainloop.producer_acquire(state)
                            bar = mainloop.producer_get_barrier(state)
                            self._load_weights(tma_b, tBsB, tBgB0, tBgB1, kt, state.index, bar, b_mcast_mask)
                            state.advance()
                    cute.arch.griddepcontrol_wait()
                    cute.arch.griddepcontrol_launch_dependents()
                while t < total_tiles:
                    # the next tile is drawn now and used after this one's loads: the atomic's latency hides
                    t_next = t + num_clusters
                    if const_expr(self.dynamic):
                        t_next = self._draw_tile(mSched, sched_on, t_next, lane, num_clusters)
                    e, m_idx, n_idx = self._tile_coords(sPrefix, t, e, n_tiles, rank)
                    start, count = self._segment(mSeg, e, max_m)
                    # A: (tile_m, tile_k, k_tiles) starting at this expert's row m_idx * tile_m
                    gA = cute.local_tile(
                        cute.domain_offset((start, 0), mA_tma), (self.tile_m, self.tile_k), (m_idx, None)
                    )
                    tAsA, tAgA = cpasync.tma_partition(
                        tma_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2)
                    )
                    tBsB, tBgB0, tBgB1 = self._weight_tiles(tma_b, mB_tma, sB_tma, e, n_idx, n_b, rank)
                    for kt in range(k_tiles):
                        if kt < pre * first:  # weights already in flight: the A tile only
                            bar = mainloop.producer_get_barrier(a_state)
                            cute.copy(tma_a, tAgA[None, kt], tAsA[None, a_state.index], tma_bar_ptr=bar)
                            a_state.advance()
                        else:
                            mainloop.producer_acquire(state)
                            bar = mainloop.producer_get_barrier(state)
                            cute.copy(tma_a, tAgA[None, kt], tAsA[None, state.index], tma_bar_ptr=bar)
                            self._load_weights(tma_b, tBsB, tBgB0, tBgB1, kt, state.index, bar, b_mcast_mask)
                            mainloop.producer_commit(state)
                            state.advance()
                    first = Int32(0)
                    t = t_next
                    if const_expr(self.dynamic):
                        sched_state = self._publish_tile(sched, sTile, sched_state, t, lane)
                mainloop.producer_tail(state)
                if const_expr(self.dynamic):
                    self._release_counter(mSched, sched_on, lane, gdim)
        else:
            cute.arch.setmaxregister_increase(232)
            if const_expr(self.prefetch):
                cute.arch.griddepcontrol_wait()
                cute.arch.griddepcontrol_launch_dependents()
            self._consumer(
                tidx, warp_idx, cluster_id, num_clusters, rank, total_tiles, sPrefix, mSeg, mBias, mRowScale, mSA, mSB,
                max_m, n_b, n_tiles, k_tiles, mainloop, tiled_mma, tiled_mma_out, sA, sB, sC,
                tma_c, mC_tma, sched, sTile,
            )

    @cute.jit
    def _consumer(
        self, tidx, warp_idx, cluster_id, num_clusters, rank, total_tiles, sPrefix, mSeg, mBias, mRowScale, mSA, mSB,
        max_m, n_b, n_tiles, k_tiles, mainloop, tiled_mma, tiled_mma_out, sA, sB, sC, tma_c, mC_tma, sched, sTile,
    ):
        mma_tidx = tidx - 128
        wg = cute.arch.make_warp_uniform(mma_tidx // 128)
        thr_mma = tiled_mma.get_slice(mma_tidx)
        thr_mma_out = tiled_mma_out.get_slice(mma_tidx)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        tCcAcc = thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n)))
        acc = cute.make_rmem_tensor(tCcAcc.shape, self.acc_dtype)
        tmp = tmp2 = acc
        if const_expr(self.scale_mode == "block"):
            tmp = cute.make_rmem_tensor(tCcAcc.shape, self.acc_dtype)
            tmp2 = tmp
            if const_expr(self.cfg.overlap_promotion):
                tmp2 = cute.make_rmem_tensor(tCcAcc.shape, self.acc_dtype)
        # output-shaped accumulator and its (row, col) coordinates within the tile
        tOcO = thr_mma_out.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n_out)))
        out = cute.make_rmem_tensor(tOcO.shape, self.acc_dtype)
        num_k_blocks = cute.size(tCrA, mode=[2])

        copy_atom_r2s = sm90_utils.sm90_get_smem_store_op(
            self.c_layout, elem_ty_d=self.c_dtype, elem_ty_acc=self.acc_dtype
        )
        copy_atom_c = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(False, 4), self.c_dtype)
        tiled_copy_r2s = cute.make_tiled_copy_S(copy_atom_r2s, cute.make_tiled_copy_C_atom(copy_atom_c, tiled_mma_out))
        thr_copy_r2s = tiled_copy_r2s.get_slice(mma_tidx)
        tRS_sD = thr_copy_r2s.partition_D(sC)
        tRS_rAcc = tiled_copy_r2s.retile(out)
        rD_shape = cute.shape(thr_copy_r2s.partition_S(sC))
        tRS_rD = cute.make_rmem_tensor(rD_shape[:3], self.acc_dtype)
        tRS_rD_out = cute.make_rmem_tensor(rD_shape[:3], self.c_dtype)
        size_rD = cute.size(tRS_rD)

        store_pipe = pipeline.PipelineTmaStore.create(
            num_stages=self.epi_stage,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_mma_threads),
        )
        read_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
        release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)

        n_acc = cute.size(acc)
        n_out_frag = cute.size(out)
        tile_count = Int32(0)
        t = cluster_id
        e = Int32(0)
        sched_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, SCHED_STAGES)
        if const_expr(self.dynamic):
            t, sched_state = self._take_tile(sched, sTile, sched_state)
        while t < total_tiles:
            e, m_idx, n_idx = self._tile_coords(sPrefix, t, e, n_tiles, rank)
            start, count = self._segment(mSeg, e, max_m)

            # a warpgroup whose 64 rows all lie past the expert's end (the expert's last, short M-tile,
            # or the empty tile of a cluster pair) follows the pipeline without issuing WGMMA: its rows
            # are never stored, and the other warpgroup gets the tensor cores to itself
            first_row = wg * 64 if const_expr(SKIP_IDLE_WARPGROUPS and self.dynamic) else Int32(-self.tile_m)
            if count - m_idx * self.tile_m > first_row:
                if const_expr(self.scale_mode == "block"):
                    read_state, release_state = self._mainloop_blockwise(
                        acc, tmp, tmp2, tCcAcc, tCrA, tCrB, tiled_mma, mainloop, read_state, release_state, mSA, mSB,
                        e, start, count, m_idx, n_idx, k_tiles, num_k_blocks,
                    )
                else:
                    read_state, release_state = self._mainloop(
                        acc, tCrA, tCrB, tiled_mma, mainloop, read_state, release_state, k_tiles, num_k_blocks
                    )
            else:
                read_state, release_state = self._skip_mainloop(mainloop, read_state, release_state, k_tiles)

            # ---- epilogue math in registers: bias (before the activation), activation, row scale
            row0 = m_idx * self.tile_m
            col0 = n_idx * self.tile_n_out
            n_out_total = cute.size(mC_tma, mode=[1])
            half = n_acc // 2
            s_tensor = Float32(1.0)
            if const_expr(self.scale_mode == "tensor"):
                s_tensor = mSA[0] * mSB[e]
            for i in cutlass.range_constexpr(n_out_frag):
                r, c = tOcO[i]
                col = cutlass.min(col0 + c, n_out_total - 1)
                v = acc[i]
                up = v
                if const_expr(self.gated):
                    up = acc[i + half]
                if const_expr(self.scale_mode == "tensor"):
                    v = v * s_tensor
                    up = up * s_tensor
                elif const_expr(self.scale_mode == "token"):
                    sa = mSA[start + cutlass.min(row0 + r, count - 1)]
                    v = v * (sa * mSB[e, col])
                    if const_expr(self.gated):
                        up = up * (sa * mSB[e, n_out_total + col])
                if const_expr(self.gated):
                    if const_expr(self.has_bias):
                        v = v + mBias[e, col].to(Float32)
                        up = up + mBias[e, n_out_total + col].to(Float32)
                    v = _gated(v, up, self.activation)
                elif const_expr(self.has_bias):
                    v = v + mBias[e, col].to(Float32)
                if const_expr(self.has_row_scale):
                    v = v * mRowScale[start + cutlass.min(row0 + r, count - 1)]
                out[i] = v

            # ---- epilogue store: registers -> smem (stmatrix) -> clipped TMA store
            r0 = start + row0
            end = start + count
            l = r0 + self.tile_m
            m_off = Int32(0)
            if r0 + self.tile_m > end:
                l = end
                m_off = r0 + self.tile_m - end
            gC = cute.local_tile(
                cute.domain_offset((m_off, 0), mC_tma[None, None, l]),
                (self.tile_m, self.tile_n_out), (0, n_idx),
            )
            gC_epi = cute.zipped_divide(gC, self.epi_tile)
            bSG_sD, bSG_gD = cpasync.tma_partition(
                tma_c, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2), gC_epi
            )
            epi_num = cute.size(gC_epi, mode=[1])
            epi_shape = gC_epi.shape[1]
            epi_layout = cute.make_layout(epi_shape, stride=(epi_shape[1], 1))
            for epi_idx in cutlass.range_constexpr(epi_num):
                for v in cutlass.range_constexpr(size_rD):
                    tRS_rD[v] = tRS_rAcc[epi_idx * size_rD + v]
                tRS_rD_out.store(tRS_rD.load().to(self.c_dtype))
                buf = (tile_count * epi_num + epi_idx) % self.epi_stage
                cute.copy(tiled_copy_r2s, tRS_rD_out, tRS_sD[None, None, None, buf])
                cute.arch.fence_proxy("async.shared", space="cta")
                self.epi_barrier.arrive_and_wait()
                if warp_idx == self.epi_store_warp:
                    cute.copy(tma_c, bSG_sD[None, buf], bSG_gD[None, epi_layout.get_hier_coord(epi_idx)])
                    store_pipe.producer_commit()
                    store_pipe.producer_acquire()
                self.epi_barrier.arrive_and_wait()
            tile_count = tile_count + 1
            if const_expr(self.dynamic):
                t, sched_state = self._take_tile(sched, sTile, sched_state)
            else:
                t = t + num_clusters
        store_pipe.producer_tail()
