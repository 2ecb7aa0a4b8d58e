"""Grouped GEMMs over experts: per-arch CuTe DSL kernels behind one torch-facing call."""

from .config import EPILOGUES, GemmConfig, pick_config
from .interface import grouped_gemm

__all__ = ["EPILOGUES", "GemmConfig", "grouped_gemm", "pick_config"]
