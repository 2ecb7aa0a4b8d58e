"""GPU: cute_moe.plan.make_plan is bitwise equal to plan_reference on ragged routings."""

from __future__ import annotations

import pytest
import torch

from cute_moe.plan import make_plan, plan_reference
from routing_data import ROUTINGS, random_topk_ids
from test_plan_cpu import check_plan_invariants, plan_fields

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _poison_allocator(nbytes: int) -> None:
    """Fill and free a block so the caching allocator hands dirty memory to the next allocation."""
    torch.full((nbytes // 4 + 1024,), -123456789, dtype=torch.int32, device=DEV)
    torch.full((nbytes // 4,), -123456789, dtype=torch.int32, device=DEV)


def _check(ids, num_experts, block_m=None, max_m=None):
    n, E = ids.numel(), num_experts
    _poison_allocator(4 * (3 * n + 4 * E + E * (max_m or 0) + (n + E * (block_m or 1)) * 2))
    plan = make_plan(ids, E, block_m=block_m, max_m=max_m)
    ref = plan_reference(ids, E, block_m=block_m, max_m=max_m)
    for name, t in plan_fields(ref).items():
        got = getattr(plan, name)
        assert got.dtype == torch.int32 and got.device.type == "cuda", name
        assert torch.equal(got, t), f"{name}: first mismatch at {torch.nonzero(got != t)[:3].tolist()}"
    check_plan_invariants(plan, ids)
    again = make_plan(ids, E, block_m=block_m, max_m=max_m)
    for name, t in plan_fields(plan).items():
        assert torch.equal(getattr(again, name), t), name
    return plan


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [
    (1, 8, 256), (7, 2, 8), (255, 8, 256), (1000, 4, 128), (2048, 1, 8), (2049, 8, 60), (4096, 8, 256),
    (65536, 8, 256), (65536, 2, 8), (9000, 16, 512), (3000, 8, 1024),
])
def test_plan_matches_reference(kind, num_tokens, top_k, num_experts):
    ids = random_topk_ids(num_tokens, top_k, num_experts, kind, device=DEV)
    for block_m, max_m in ((None, None), (128, None), (64, 2 * num_tokens), (1, max(1, num_tokens // 16))):
        _check(ids, num_experts, block_m, max_m)


def test_plan_edge_cases():
    E = 16
    _check(torch.full((1, 1), 3, dtype=torch.int32, device=DEV), E, 128, 4)            # T = 1
    _check(torch.full((513, 1), E - 1, dtype=torch.int32, device=DEV), E, 128, 100)    # all on one expert, overflow
    _check(torch.full((5000, 2), -1, dtype=torch.int32, device=DEV), E, 16, 8)         # everything dropped
    _check(torch.empty((0, 4), dtype=torch.int32, device=DEV), E, 128, 8)              # no tokens
    ids = random_topk_ids(3001, 4, E, device=DEV).long()
    _check(ids, E, 32, 3001)                                                           # int64 ids
    plan = _check(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=DEV), E, 4, 1)
    assert plan.overflow.item() == 1


def test_plan_cupy_ids():
    cupy = pytest.importorskip("cupy")
    ids = random_topk_ids(100, 4, 32, device=DEV)
    plan = make_plan(cupy.from_dlpack(ids), 32, block_m=16)
    assert torch.equal(plan.padded_row_src, plan_reference(ids, 32, block_m=16).padded_row_src)


def test_plan_cuda_graph_replay_with_new_ids():
    T, k, E = 4096, 8, 256
    static = random_topk_ids(T, k, E, device=DEV)
    make_plan(static, E, block_m=128, max_m=T)  # warm-up (compile, load)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan = make_plan(static, E, block_m=128, max_m=T)
    for kind in ROUTINGS:
        static.copy_(random_topk_ids(T, k, E, kind, device=DEV))
        g.replay()
        torch.cuda.synchronize()
        ref = plan_reference(static, E, block_m=128, max_m=T)
        for name, t in plan_fields(ref).items():
            assert torch.equal(getattr(plan, name), t), (kind, name)
