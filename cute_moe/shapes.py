"""The reference MoE shapes every benchmark and test sweep uses (defined once, here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer's shape: E experts, top-k, hidden size H, expert intermediate size I."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int

    def scaled(self, hidden: int | None = None, intermediate: int | None = None,
               num_experts: int | None = None) -> "MoEShape":
        """A reduced copy (for demos and CPU tests) keeping the routing structure."""
        return MoEShape(
            f"{self.name}-reduced",
            num_experts or self.num_experts,
            self.top_k,
            hidden or self.hidden,
            intermediate or self.intermediate,
        )


MIXTRAL_8X7B = MoEShape("Mixtral-8x7B", 8, 2, 4096, 14336)
DEEPSEEK_V3 = MoEShape("DeepSeek-V3", 256, 8, 7168, 2048)
QWEN3_30B_A3B = MoEShape("Qwen3-30B-A3B", 128, 8, 2048, 768)
GPT_OSS_120B = MoEShape("GPT-OSS-120B", 128, 4, 2880, 2880)

REFERENCE_SHAPES: tuple[MoEShape, ...] = (MIXTRAL_8X7B, DEEPSEEK_V3, QWEN3_30B_A3B, GPT_OSS_120B)
