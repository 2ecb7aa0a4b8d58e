"""Grouped-GEMM tile configurations and the heuristic that picks one per problem."""

from __future__ import annotations

from dataclasses import dataclass

EPILOGUES = ("none", "silu", "gelu", "swiglu_oai")


@dataclass(frozen=True)
class GemmConfig:
    """Static shape of one compiled grouped-GEMM kernel.

    tile_n is the accumulator width; a gated epilogue (GEMM1 + activation) writes tile_n // 2
    output columns because each tile holds gate and up columns side by side.
    tile_k is fixed by the operand type (one 128-byte swizzle atom): 64 for bf16, 128 for fp8.
    stages=0 means "as many as shared memory holds".
    """

    tile_m: int = 128
    tile_n: int = 256
    stages: int = 0

    def __post_init__(self):
        if self.tile_m not in (64, 128):
            raise ValueError(f"tile_m must be 64 or 128, got {self.tile_m}")
        if self.tile_n % 16 or not 16 <= self.tile_n <= 256:
            raise ValueError(f"tile_n must be a multiple of 16 in [16, 256], got {self.tile_n}")
        if self.stages < 0:
            raise ValueError(f"stages must be >= 0, got {self.stages}")


def pick_config(rows_per_expert: float, n: int, k: int, num_experts: int, gated: bool) -> GemmConfig:
    """Choose a tile for a problem with about ``rows_per_expert`` rows in each active expert.

    Few rows (decode): 64-row tiles waste less of each weight tile's reuse. Many rows: 128x256 tiles,
    the largest that keep the fp32 accumulators of two consumer warpgroups in registers.
    """
    tile_m = 64 if rows_per_expert <= 64 else 128
    n_cols = n // 2 if gated else n
    if gated:
        tile_n = 256 if n_cols >= 128 else 128
    else:
        tile_n = 256 if n_cols >= 256 and tile_m == 128 else 128
    return GemmConfig(tile_m=tile_m, tile_n=tile_n)
