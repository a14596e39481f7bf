"""Capacity per (routing group, expert), drop policies, dropless, load and drop counts."""

from __future__ import annotations

import pytest
import torch

from moe_train.routing import RouteKey
from tests.helpers.routing import (
    KINDS,
    TOKEN_CHOICE,
    capacity_of,
    make_router,
    slot_keys,
    tokens,
)

T, GS = 64, 16


def capped_and_free(kind, policy, cf=0.5, **kw):
    """Two routers with the same parameters: capacity `cf` and dropless."""
    if kind == "tree":
        kw.setdefault("tree_gate", "sigmoid")  # weights = branch probabilities = scores
    free = make_router(kind, capacity_factor=None, group_size=GS, **kw).eval()
    capped = make_router(kind, capacity_factor=cf, drop_policy=policy, group_size=GS, **kw).eval()
    capped.load_state_dict(free.state_dict())
    return capped, free


def split_kept(capped_a, free_a):
    """Mask over the dropless slots: kept by the capped router."""
    kept_keys = slot_keys(capped_a)
    free_keys = slot_keys(free_a)
    assert torch.isin(kept_keys, free_keys).all()  # capacity only removes slots
    return torch.isin(free_keys, kept_keys)


@pytest.mark.parametrize("policy", ["score", "position"])
@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_capacity_never_exceeded(kind, policy):
    capped, free = capped_and_free(kind, policy)
    x = tokens(T)
    a, b = capped(x), free(x)
    E = capped.num_experts
    cap = capacity_of(capped.cfg, GS, E)
    bucket = (a.token // GS) * E + a.expert
    load = torch.bincount(bucket, minlength=(T // GS) * E).view(T // GS, E)
    assert torch.all(load <= cap)
    assert a.dropped > 0  # the factor 0.5 must bind somewhere
    # a (group, expert) drops only when it is full
    want = torch.bincount((b.token // GS) * E + b.expert, minlength=(T // GS) * E).view(-1, E)
    assert torch.equal(load, torch.minimum(want, cap))


@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_score_policy_keeps_higher_scores(kind):
    capped, free = capped_and_free(kind, "score")
    x = tokens(T)
    a, b = capped(x), free(x)
    kept = split_kept(a, b)
    assert (~kept).any()
    E = capped.num_experts
    bucket = (b.token // GS) * E + b.expert
    score = b.weight.detach()
    for u in bucket[~kept].unique():
        in_b = bucket == u
        assert score[in_b & kept].min() >= score[in_b & ~kept].max()


@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_position_policy_keeps_first_choices_then_earlier_tokens(kind):
    capped, free = capped_and_free(kind, "position")
    x = tokens(T)
    a, b = capped(x), free(x)
    kept = split_kept(a, b)
    assert (~kept).any()
    E = capped.num_experts
    # choice rank of each dropless slot: 0 for the token's best expert, 1 for its second...
    # (for the tree the root is choice 0, the level-l node choice l; prototype j is choice j)
    if kind == "tree":
        choice = torch.floor(torch.log2(b.expert.double() + 1)).long()
    elif kind == "prototype":
        choice = b.expert // (E // capped.cfg.top_k)
    else:
        order = torch.argsort(b.weight.detach(), descending=True, stable=True)
        order = order[torch.argsort(b.token[order], stable=True)]
        choice = torch.empty_like(b.token)
        first = torch.cumsum(torch.bincount(b.token, minlength=T), 0) - torch.bincount(
            b.token, minlength=T
        )
        choice[order] = torch.arange(b.token.numel()) - first[b.token[order]]
    rank = choice * T + b.token  # GShard: all first choices, then second choices; earlier first
    bucket = (b.token // GS) * E + b.expert
    for u in bucket[~kept].unique():
        in_b = bucket == u
        assert rank[in_b & kept].max() < rank[in_b & ~kept].min()
    if kind in ("topk", "sam"):  # some bucket mixes first and second choices
        mixed = [
            u
            for u in bucket.unique()
            if (choice[bucket == u] == 0).any() and (choice[bucket == u] > 0).any()
        ]
        assert mixed


@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_dropless_drops_nothing(kind):
    r = make_router(kind, capacity_factor=None, group_size=GS).eval()
    a = r(tokens(T))
    assert int(a.dropped) == 0
    assert a.requested == T * r.cfg.experts_per_token() == a.num_slots


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_load_and_dropped_counts(kind, train):
    kw = {"max_experts_per_token": 1} if kind == "expert_choice" else {"capacity_factor": 0.5}
    r = make_router(kind, group_size=GS, **kw).train(train)
    a = r(tokens(T), RouteKey(3))
    assert a.expert_load.shape == (r.num_experts,)
    assert torch.equal(a.expert_load, torch.bincount(a.expert, minlength=r.num_experts))
    assert int(a.dropped) == a.requested - a.num_slots
    assert int(a.dropped) > 0
    assert a.token.dtype == a.expert.dtype == torch.int64
    assert a.weight.dtype == torch.float32
    assert a.token.shape == a.expert.shape == a.weight.shape
