"""cute-moe: fused Mixture-of-Experts GPU kernels (CuTe DSL grouped GEMMs, CuPy routing/permute/combine)."""

from . import nn, ops  # ops: the torch.library custom ops used under torch.compile
from .api import BoundMoE, bind_moe, fused_moe, last_backend, moe, route
from .quant import QuantConfig, QuantizedWeights, quantize_weights
from .reference import ACTIVATIONS, ROUTING_PRESETS, SCORINGS
from .shapes import DEEPSEEK_V3, GPT_OSS_120B, MIXTRAL_8X7B, QWEN3_30B_A3B, REFERENCE_SHAPES, MoEShape
from .validate import debug_checks_enabled, set_debug_checks
from .workspace import Workspace
from .precompile import warmup
from .profiling import profile

__version__ = "0.1.0"
