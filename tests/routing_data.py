"""Random routings and output poisoning shared by the plan / routing / permute tests (CPU or GPU)."""

from __future__ import annotations

import torch

ROUTINGS = ("random", "skewed", "one_expert", "some_empty", "with_dropped")


def random_topk_ids(num_tokens: int, top_k: int, num_experts: int, kind: str = "random", *,
                    device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """[T, k] int32 expert ids, distinct per token (as top-k gives), of a routing ``kind``:

    random: uniform; skewed: logits with a strong per-expert bias (a few hot experts);
    one_expert: every token's first slot is expert E-1 (all tokens share it);
    some_empty: the odd experts get no slot (unless k > ceil(E/2)); with_dropped: random with ~10%
    of slots -1 (ids outside [0, E) are dropped by the plan).
    """
    g = generator
    logits = torch.rand(num_tokens, num_experts, generator=g, device=device)
    if kind == "skewed":
        logits = logits + 4 * torch.rand(num_experts, generator=g, device=device) ** 4
    elif kind == "one_expert":
        logits[:, -1] = 2.0
    elif kind == "some_empty":
        logits[:, 1::2] = -1.0
    ids = logits.topk(top_k, dim=1).indices.to(torch.int32)
    if kind == "with_dropped":
        drop = torch.rand(ids.shape, generator=g, device=device) < 0.1
        ids = torch.where(drop, torch.full_like(ids, -1), ids)
    return ids


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` full of a value no kernel writes: NaN for floats (0x7f = NaN for fp8),
    a large negative sentinel for ints."""
    if t.dtype == torch.float8_e4m3fn:
        return torch.full(t.shape, 0x7F, dtype=torch.uint8, device=t.device).view(torch.float8_e4m3fn)
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -123456789)
