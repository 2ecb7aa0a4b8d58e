"""CPU checks of the routing plan definition (cute_moe.plan.plan_reference) and the plan's API."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cute_moe.plan import RoutingPlan, make_plan, padded_capacity, plan_reference
from routing_data import ROUTINGS, random_topk_ids


def _naive_plan(ids: torch.Tensor, num_experts: int, block_m, max_m) -> dict:
    """The plan written as plain Python loops (an independent twin of plan_reference)."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    per_expert = [[i for i, e in enumerate(flat) if e == x] for x in range(num_experts)]
    counts = [len(p) for p in per_expert]
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    row_src = [i for p in per_expert for i in p] + [-1] * (n - cu[-1])
    token_rows = [-1] * n
    for r, i in enumerate(row_src[:cu[-1]]):
        token_rows[i] = r
    out = dict(counts=counts, cu_seqlens=cu, row_src=row_src, token_rows=token_rows)
    if block_m is not None:
        pcu = [0]
        for c in counts:
            pcu.append(pcu[-1] + -(-c // block_m) * block_m)
        cap = (n + num_experts * (block_m - 1)) // block_m * block_m
        prow_src = [-1] * cap
        ptok = [-1] * n
        eob = [-1] * (cap // block_m)
        for e, p in enumerate(per_expert):
            for j, i in enumerate(p):
                prow_src[pcu[e] + j] = i
                ptok[i] = pcu[e] + j
            for b in range(pcu[e] // block_m, pcu[e + 1] // block_m):
                eob[b] = e
        out.update(padded_cu_seqlens=pcu, padded_row_src=prow_src, padded_token_rows=ptok, expert_of_block=eob)
    if max_m is not None:
        mrow_src = [-1] * (num_experts * max_m)
        mtok = [-1] * n
        for e, p in enumerate(per_expert):
            for j, i in enumerate(p[:max_m]):
                mrow_src[e * max_m + j] = i
                mtok[i] = e * max_m + j
        out.update(masked_m=[min(c, max_m) for c in counts], masked_row_src=mrow_src, masked_token_rows=mtok,
                   overflow=[int(any(c > max_m for c in counts))])
    return out


def check_plan_invariants(plan: RoutingPlan, ids: torch.Tensor) -> None:
    """Structural invariants every plan satisfies (used by the CPU and GPU tests)."""
    E, n = plan.num_experts, plan.num_rows
    flat = ids.reshape(-1).long().cpu()
    valid = (flat >= 0) & (flat < E)
    counts, cu = plan.counts.long().cpu(), plan.cu_seqlens.long().cpu()
    row_src, token_rows = plan.row_src.long().cpu(), plan.token_rows.reshape(-1).long().cpu()
    assert torch.equal(counts, torch.bincount(flat[valid], minlength=E))
    assert cu[0] == 0 and torch.equal(cu[1:], counts.cumsum(0))
    nvalid = int(valid.sum())
    assert int(cu[-1]) == nvalid
    src = row_src[:nvalid]
    assert torch.all(row_src[nvalid:] == -1)
    assert torch.equal(torch.sort(src).values, torch.nonzero(valid).flatten())  # a permutation of valid slots
    assert torch.equal(token_rows[src], torch.arange(nvalid))                   # inverse permutations
    assert torch.all(token_rows[~valid] == -1)
    seg = torch.repeat_interleave(torch.arange(E), counts)
    assert torch.equal(flat[src], seg)                                          # expert-contiguous
    if nvalid > 1:  # ascending flat index within each segment
        same = seg[1:] == seg[:-1]
        assert torch.all(src[1:][same] > src[:-1][same])
    if plan.block_m is not None:
        bm = plan.block_m
        pcu = plan.padded_cu_seqlens.long().cpu()
        prow_src = plan.padded_row_src.long().cpu()
        assert prow_src.numel() == plan.padded_rows == padded_capacity(n, E, bm)
        assert plan.padded_rows % bm == 0 and plan.padded_rows >= int(pcu[-1])
        assert torch.equal(pcu[1:] - pcu[:-1], (counts + bm - 1) // bm * bm)
        local = torch.arange(nvalid) - cu[seg]
        assert torch.equal(prow_src[pcu[seg] + local], src)
        assert int((prow_src >= 0).sum()) == nvalid                             # everything else is padding
        ptok = plan.padded_token_rows.reshape(-1).long().cpu()
        assert torch.equal(ptok[src], pcu[seg] + local) and torch.all(ptok[~valid] == -1)
        eob = plan.expert_of_block.long().cpu()
        assert eob.numel() == plan.padded_rows // bm
        used = int(pcu[-1]) // bm
        blocks = torch.arange(used) * bm
        assert torch.equal(eob[:used], torch.searchsorted(pcu, blocks, right=True) - 1)
        assert torch.all(eob[used:] == -1)
    if plan.max_m is not None:
        max_m = plan.max_m
        assert torch.equal(plan.masked_m.long().cpu(), counts.clamp(max=max_m))
        mrow_src = plan.masked_row_src.long().cpu()
        assert mrow_src.shape == (E, max_m)
        local = torch.arange(nvalid) - cu[seg]
        keep = local < max_m
        assert torch.equal(mrow_src[seg[keep], local[keep]], src[keep])
        assert int((mrow_src >= 0).sum()) == int(keep.sum())
        mtok = plan.masked_token_rows.reshape(-1).long().cpu()
        assert torch.equal(mtok[src[keep]], seg[keep] * max_m + local[keep])
        assert torch.all(mtok[src[~keep]] == -1) and torch.all(mtok[~valid] == -1)
        assert int(plan.overflow.item()) == int(bool((counts > max_m).any()))


def plan_fields(plan: RoutingPlan) -> dict:
    return {k: v for k, v in vars(plan).items() if isinstance(v, torch.Tensor)}


@settings(max_examples=150, deadline=None)
@given(num_tokens=st.integers(0, 70), top_k=st.integers(1, 6), num_experts=st.integers(1, 40),
       kind=st.sampled_from(ROUTINGS), block_m=st.sampled_from([None, 1, 2, 4, 16, 128]),
       max_m=st.sampled_from([None, 1, 3, 64]), int64=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_plan_reference_invariants(num_tokens, top_k, num_experts, kind, block_m, max_m, int64, seed):
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(seed)
    ids = random_topk_ids(num_tokens, top_k, num_experts, kind, generator=g)
    if int64:
        ids = ids.long()
    plan = plan_reference(ids, num_experts, block_m=block_m, max_m=max_m)
    check_plan_invariants(plan, ids)
    naive = _naive_plan(ids, num_experts, block_m, max_m)
    for name, t in plan_fields(plan).items():
        assert t.dtype == torch.int32, name
        assert t.reshape(-1).tolist() == naive[name], name


@pytest.mark.parametrize("case", ["single_token", "all_on_one_expert", "empty_experts", "no_tokens"])
def test_plan_reference_edge_cases(case):
    E, k = 8, 2
    ids = {
        "single_token": torch.tensor([[3, 5]]),
        "all_on_one_expert": torch.stack([torch.full((9,), 7), torch.arange(9) % 7], 1),
        "empty_experts": torch.tensor([[0, 1], [1, 0], [0, 1]]),
        "no_tokens": torch.empty(0, k, dtype=torch.long),
    }[case].to(torch.int32)
    plan = plan_reference(ids, E, block_m=4, max_m=2)
    check_plan_invariants(plan, ids)
    if case == "all_on_one_expert":
        assert plan.counts[7] == 9 and plan.overflow.item() == 1
        assert plan.masked_m[7] == 2
    if case == "empty_experts":
        assert plan.counts[2:].sum() == 0 and plan.expert_of_block.tolist() == [0, 1] + [-1] * 5
    if case == "no_tokens":
        assert plan.cu_seqlens.tolist() == [0] * (E + 1) and plan.padded_row_src.tolist() == [-1] * 24


def test_plan_layout_helpers():
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    plan = plan_reference(ids, 3, block_m=2)
    assert plan.rows("flat") == 4 and plan.rows("padded") == plan.padded_rows == 6
    assert plan.dest_rows("padded") is plan.padded_token_rows
    with pytest.raises(ValueError, match="max_m"):
        plan.rows("masked")
    with pytest.raises(ValueError, match="layout"):
        plan.dest_rows("sorted")


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(4, dtype=torch.int32), ValueError, "2-D"),
    (torch.zeros(2, 2, dtype=torch.float32), TypeError, "int32 or int64"),
    (torch.zeros(2, 4, dtype=torch.int32)[:, ::2], ValueError, "contiguous"),
])
def test_plan_input_validation(bad, err, match):
    with pytest.raises(err, match=match):
        plan_reference(bad, 4)


def test_plan_argument_validation():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_experts"):
        plan_reference(ids, 0)
    with pytest.raises(ValueError, match="block_m"):
        plan_reference(ids, 4, block_m=0)
    with pytest.raises(TypeError, match="max_m"):
        plan_reference(ids, 4, max_m=2.0)
    with pytest.raises(ValueError, match="CUDA"):
        make_plan(ids, 4)


def test_gpu_ops_reject_cpu_tensors():
    from cute_moe.permute import combine, permute, permute_fp8
    from cute_moe.routing import route_gpu

    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    plan = plan_reference(ids, 3, block_m=4)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="router_logits: expected a CUDA tensor"):
        route_gpu(torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        permute(x, plan)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        permute_fp8(x, plan, layout="padded")
    with pytest.raises(ValueError, match="y: expected a CUDA tensor"):
        combine(torch.randn(4, 32), plan, torch.rand(2, 2))
    with pytest.raises(TypeError, match="plan"):
        permute(x, "plan")
