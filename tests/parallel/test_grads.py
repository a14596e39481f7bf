"""Gradient policy (moe_train.parallel.grads) on hand-made gradients: the flat-bucket sync over
several buckets and dtypes, gradients present on one rank only, world scaling, expert grads over
the dp group, the global norm with tied and expert parameters counted once, and a DDP wrapper
built without warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from moe_train.parallel import ParallelDims, ProcessGroups, clip_grad_norm_, mark_expert
from moe_train.parallel import grads as grads_mod
from tests.helpers.distributed import run_ranks


class Toy(nn.Module):
    """Dense fp32 and fp64 parameters, a tied pair, an expert, and one parameter that only some
    ranks use (its grad is None elsewhere)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(7))
        self.b = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
        self.emb = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter
        self.e = mark_expert(nn.Parameter(torch.zeros(2, 5)))
        self.rare = nn.Parameter(torch.zeros(6))


def fill(model: Toy, rank: int) -> None:
    """Rank-dependent gradients; `rare` has a gradient on rank 1 only."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name == "rare" and rank != 1:
            p.grad = None
            continue
        g = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
        p.grad = (g + 1) * (i + 1) * (rank + 1)


def expected(world: int, ep: int, rank: int) -> dict[str, torch.Tensor]:
    """What each rank should hold after sync: dense SUM over the world / world; experts SUM over
    the ranks with my ep_rank / world."""
    per_rank = []
    for r in range(world):
        m = Toy()
        fill(m, r)
        per_rank.append({n: p.grad for n, p in m.named_parameters()})
    out = {}
    for name in per_rank[0]:
        peers = [r for r in range(world) if name != "e" or r % ep == rank % ep]
        got = [per_rank[r][name] for r in peers if per_rank[r][name] is not None]
        out[name] = sum(got) / world
    return out


def _case(ep: int, rank: int, world: int) -> dict:
    from tests.helpers.ep_cases import make_state

    state = make_state(ep, num_experts=4)
    grads_mod.BUCKET_ELEMS = 5  # several buckets per dtype
    model = Toy()
    fill(model, rank)
    state.sync_gradients(model)
    want = expected(world, ep, rank)
    named = dict(model.named_parameters())
    diff = max(float((named[n].grad - want[n]).abs().max()) for n in want)
    # global norm: dense grads once, expert grads summed over the ep group (other experts there)
    dense_sq = sum(float(want[n].double().pow(2).sum()) for n in want if n != "e")
    expert_sq = sum(float(expected(world, ep, r)["e"].double().pow(2).sum()) for r in range(ep))
    want_norm = math.sqrt(dense_sq + expert_sq)
    norm = float(state.clip_grad_norm_(model, 0.0))  # 0: measure only
    clipped = float(state.clip_grad_norm_(model, 0.5 * want_norm))  # halves every gradient
    after = float(state.clip_grad_norm_(model, 0.0))
    halved = max(float((named[n].grad - 0.5 * want[n]).abs().max()) for n in want)
    return {
        "diff": diff,
        "norm": norm,
        "want": want_norm,
        "clipped": clipped,
        "after": after,
        "halved": halved,
    }


def two_rank_main(rank: int, world: int) -> dict:
    from moe_train.parallel.parallelize import wrap_data_parallel
    from tests.helpers.ep_cases import make_state

    out = {f"ep{ep}": _case(ep, rank, world) for ep in (1, 2)}
    state = make_state(1, num_experts=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap_data_parallel(nn.Linear(4, 4), state.groups.dense)
    out["ddp_warnings"] = [str(w.message) for w in caught]
    state.shutdown()
    return out


@pytest.mark.distributed
def test_flat_sync_scaling_and_norm_on_two_ranks():
    for rank, res in enumerate(run_ranks(two_rank_main, 2, timeout=120)):
        for ep in ("ep1", "ep2"):
            r = res[ep]
            assert r["diff"] <= 1e-6, (rank, ep, r)
            assert r["norm"] == pytest.approx(r["want"], rel=1e-6), (rank, ep, r)
            assert r["clipped"] == pytest.approx(r["want"], rel=1e-6), (rank, ep, r)
            assert r["after"] == pytest.approx(0.5 * r["want"], rel=1e-5), (rank, ep, r)
            assert r["halved"] <= 1e-5 * r["want"], (rank, ep, r)
        assert not any("deprecated" in w for w in res["ddp_warnings"]), res["ddp_warnings"]


def test_buckets_keep_order_and_bound_the_size():
    ts = [torch.zeros(n) for n in (3, 3, 9, 1, 1, 2)]
    got = grads_mod.buckets(ts, 6)
    assert [[t.numel() for t in b] for b in got] == [[3, 3], [9], [1, 1, 2]]
    assert [t for b in got for t in b] == ts


def test_one_process_norm_counts_tied_parameters_once_and_clips():
    model = Toy()
    fill(model, 0)
    dims, groups = ParallelDims(), ProcessGroups()
    grads_mod.sync_gradients(model, dims, groups)  # one process: nothing to do
    unique = [p.grad for p in model.parameters() if p.grad is not None]  # parameters() dedups
    want = torch.sqrt(sum(g.double().pow(2).sum() for g in unique))
    norm = clip_grad_norm_(model, 1.0, dims, groups)
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    after = torch.sqrt(sum(g.double().pow(2).sum() for g in unique))
    assert float(after) == pytest.approx(1.0, rel=1e-5)
