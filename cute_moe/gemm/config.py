"""Grouped-GEMM tile configurations and the heuristic that picks one per problem."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

EPILOGUES = ("none", "silu", "gelu", "swiglu_oai")
TILE_N = tuple(range(64, 257, 32))


@dataclass(frozen=True)
class GemmConfig:
    """Static shape of one compiled grouped-GEMM kernel.

    tile_n is the accumulator width, a multiple of 32 from 64 to 256 (WGMMA takes any multiple of 8;
    widths between the powers of two let a decode GEMM cut N into as many tiles as there are SMs);
    a gated epilogue (GEMM1 + activation) writes tile_n // 2 output columns because each tile holds
    gate and up columns side by side. Blockwise fp8 needs 64, 128 or 256 (block-aligned halves).
    tile_k is fixed by the operand type (one 128-byte swizzle atom): 64 for bf16, 128 for fp8.
    cluster_m=2 pairs CTAs on consecutive M-tiles of one expert and multicasts their shared weight
    tile (halving its L2->SM traffic); an expert with an odd M-tile count gets one empty tile.
    stages=0 means "as many as shared memory holds".
    overlap_promotion (blockwise fp8 only): a second scratch accumulator so the next k-tile's WGMMA
    runs while the previous one is promoted into the fp32 accumulator (more registers); off, each
    k-tile's WGMMA is waited for before its promotion (serial).
    dynamic (cluster_m=1 only): CTAs take their tiles after the first from a global counter, in
    order, instead of every grid-size-th tile; the tiles in flight then stay a compact window of the
    tile list however unequal their costs (an expert's last M-tile of <= 64 rows costs one consumer
    warpgroup), so co-resident CTAs keep sharing weight tiles in L2.
    """

    tile_m: int = 128
    tile_n: int = 256
    cluster_m: int = 1
    stages: int = 0
    overlap_promotion: bool = False
    dynamic: bool = False

    def __post_init__(self):
        if self.tile_m not in (64, 128):
            raise ValueError(f"tile_m must be 64 or 128, got {self.tile_m}")
        if self.tile_n not in TILE_N:
            raise ValueError(f"tile_n must be a multiple of 32 from 64 to 256, got {self.tile_n}")
        if self.cluster_m not in (1, 2):
            raise ValueError(f"cluster_m must be 1 or 2, got {self.cluster_m}")
        if self.stages < 0:
            raise ValueError(f"stages must be >= 0, got {self.stages}")
        if self.dynamic and self.cluster_m != 1:
            raise ValueError("dynamic tile scheduling needs cluster_m=1")


PREFILL_TILE_N = (256, 224, 192)
# Prefill with fewer rows per expert than this schedules tiles dynamically (GemmConfig.dynamic). Measured
# (H100, T=8192, same-run A/B against the static order, .device/ab_dyn2.py): bf16 GEMM1+GEMM2 1.11x faster
# for DeepSeek-V3 (256 rows per expert), 1.09x GPT-OSS-120B (256), 1.04x Qwen3-30B-A3B (512); blockwise
# fp8 1.03x / 1.06x / 1.12x. Mixtral-8x7B (2048 rows per expert, 3% of M-tiles short) gains nothing
# (bf16 1.00x; its GEMM1 keeps 2-CTA multicast, which blockwise fp8 needs: 1.07x faster than dynamic).
DYNAMIC_BELOW = 1024
MAX_N_PADDING = 0.03


@lru_cache(maxsize=None)  # pick_config runs on every GEMM call; (n_out, gated) are the model's few shapes
def prefill_tile_n(n_out: int, gated: bool) -> int:
    """The widest of PREFILL_TILE_N whose last N-tile pads the output columns by at most 3%, else the
    one that pads least. Measured (H100, T=8192): GPT-OSS GEMM2 (N=2880) 224 wide is 1.12x faster
    than 256 (12 tiles pad 6.7%, 13 tiles of 224 pad 1.1%); its GEMM1 (2.2% padding at 256) and
    every other shape (no padding) are fastest at 256."""
    def padding(tile_n):
        out = tile_n // 2 if gated else tile_n
        return -(-n_out // out) * out / n_out - 1

    for tile_n in PREFILL_TILE_N:
        if padding(tile_n) <= MAX_N_PADDING:
            return tile_n
    return min(PREFILL_TILE_N, key=padding)


def pick_config(rows: int, n: int, k: int, num_experts: int, gated: bool, num_sms: int = 132,
                masked_max_m: int = 0, blockwise: bool = False) -> GemmConfig:
    """Choose a tile for ``rows`` routed rows over ``num_experts`` experts (or masked slots of
    ``masked_max_m`` rows).

    Many rows per expert: 128-row tiles up to 256 wide, the largest whose fp32 accumulators stay in
    the registers of two consumer warpgroups, narrowed to 224 or 192 where 256 would pad N by more
    than 3% (:func:`prefill_tile_n`); blockwise fp8 keeps a second accumulator: 128 wide. Below
    DYNAMIC_BELOW rows per expert the tiles are scheduled dynamically; above, the gated GEMM1 (and
    blockwise fp8 GEMM2) multicast weight tiles to 2-CTA clusters. Few rows
    (decode): the GEMM streams each active expert's weights once and is memory-bound: 64-row tiles,
    the narrowest N tile that keeps all tiles in one wave.
    """
    active = max(1, min(num_experts, rows))
    rows_per_expert = masked_max_m or rows / active
    if blockwise:
        # the promotion keeps scratch fp32 accumulators: 128-wide tiles fit the registers. Overlapped
        # promotion (T=8192, H200, perf/results/sm90_grouped_gemm_fp8): 3-6% faster where the k-tile
        # count is even (Mixtral, DeepSeek-V3, Qwen3), 10% slower where it is odd (GPT-OSS: 23).
        # Multicast (2-CTA clusters) for large experts (H100, T=8192): Mixtral 1.43x / 1.35x over bf16
        # instead of 1.32x / 1.30x; slower where experts hold few M-tiles (an odd count leaves an empty
        # tile): DeepSeek-V3 1.44x vs 1.64x, GPT-OSS 1.28x vs 1.53x.
        if rows_per_expert > 64:
            large = rows_per_expert >= DYNAMIC_BELOW
            return GemmConfig(128, 128, cluster_m=2 if large else 1, overlap_promotion=-(-k // 128) % 2 == 0,
                              dynamic=not large)
        return GemmConfig(64, 128)
    if rows_per_expert > 64:
        # measured on H200 (perf/results/sm90_grouped_gemm_sweep): multicast pays off for the wide
        # gated GEMM1 of large experts only
        if rows_per_expert >= DYNAMIC_BELOW:
            return GemmConfig(128, prefill_tile_n(n // 2 if gated else n, gated), cluster_m=2 if gated else 1)
        return GemmConfig(128, prefill_tile_n(n // 2 if gated else n, gated), dynamic=True)
    # Decode: memory-bound, one wave at most. Measured (H200, perf/results/sm90_decode_gemm_sweep, T=1, 8,
    # weights cold, every width of TILE_N): the narrowest tile whose tiles still fit in one wave streams
    # fastest (GPT-OSS GEMM1 192 wide: 120 tiles, 9% faster than 92 tiles of 256; Qwen3 GEMM1 96 wide:
    # 11% faster than 128); a second, partial wave of narrower tiles is 6-25% slower; if even 256-wide
    # tiles overflow one wave, 256.
    m_tiles = active * max(1, -(-int(rows_per_expert) // 64))
    n_cols = n // 2 if gated else n
    for tile_n in TILE_N:
        tile_n_out = tile_n // 2 if gated else tile_n
        if m_tiles * -(-n_cols // tile_n_out) <= num_sms:
            return GemmConfig(64, tile_n)
    return GemmConfig(64, 256)
