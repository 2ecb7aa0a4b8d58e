"""cute-moe: fused Mixture-of-Experts GPU kernels (CuTe DSL grouped GEMMs, CuPy routing/permute/combine)."""

from .shapes import DEEPSEEK_V3, GPT_OSS_120B, MIXTRAL_8X7B, QWEN3_30B_A3B, REFERENCE_SHAPES, MoEShape

__version__ = "0.1.0"
