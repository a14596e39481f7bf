"""Routing groups and layout-invariant noise: a batch split across data-parallel ranks routes
exactly as the whole batch."""

from __future__ import annotations

import pytest
import torch

from moe_train.routing import Assignment, RouteKey
from tests.helpers.routing import KINDS, make_router, same_assignment, tokens

T, GS = 64, 32


def concat(a: Assignment, b: Assignment, offset: int) -> Assignment:
    return Assignment(
        torch.cat([a.token, b.token + offset]),
        torch.cat([a.expert, b.expert]),
        torch.cat([a.weight, b.weight]),
        a.num_tokens + b.num_tokens,
        a.num_experts,
    )


def router_for(kind, **kw):
    cf = 2.0 if kind == "expert_choice" else 0.5  # small enough that capacity binds
    return make_router(kind, capacity_factor=cf, **kw)


@pytest.mark.parametrize("cfg_group", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_two_groups_route_like_each_group_alone(kind, cfg_group):
    """cfg.group_size, or the per-call group_size the layer passes (the sequence length)."""
    r = router_for(kind, group_size=GS if cfg_group else None).eval()
    x = tokens(T)
    gs = None if cfg_group else GS
    full = r(x, group_size=gs)
    first, second = r(x[:GS], group_size=gs), r(x[GS:], group_size=gs)
    same_assignment(full, concat(first, second, GS))
    assert torch.equal(full.expert_load, first.expert_load + second.expert_load)
    assert int(full.dropped) == int(first.dropped) + int(second.dropped)
    assert full.requested == first.requested + second.requested
    for name, v in full.losses.items():  # every loss is a mean over groups (or tokens)
        torch.testing.assert_close(v, (first.losses[name] + second.losses[name]) / 2)
    # and grouping matters: one group of all T tokens routes differently (capacity and
    # expert choice's picks are per group)
    whole = router_for(kind).eval()
    whole.load_state_dict(r.state_dict())
    w = whole(x)
    assert w.num_slots != full.num_slots or not torch.equal(
        torch.sort(w.token * 100 + w.expert).values,
        torch.sort(full.token * 100 + full.expert).values,
    )


def test_config_group_size_wins_over_the_per_call_default():
    """The layer passes the sequence length per call; a configured group_size takes precedence."""
    r = router_for("switch", group_size=16).eval()
    x = tokens(T)
    same_assignment(r(x, group_size=T), r(x))


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("switch", {"jitter_eps": 0.3}),
        ("topk", {"top_k": 2, "random_routing": True}),
    ],
)
def test_noise_is_keyed_by_global_token_position(kind, kw):
    r = router_for(kind, group_size=GS, **kw).train()
    x = tokens(T, scale=6.0)
    seed = 2024
    full = r(x, RouteKey(seed, 0))
    half = r(x[GS:], RouteKey(seed, GS))
    in_second = full.token >= GS
    tail = Assignment(
        full.token[in_second] - GS,
        full.expert[in_second],
        full.weight[in_second],
        GS,
        r.num_experts,
    )
    same_assignment(half, tail)
    # the noise is really there: another seed or offset changes the routing, eval has none
    other = r(x[GS:], RouteKey(seed, 0))
    clean = r.eval()(x[GS:])
    for b in (other, clean):
        assert b.num_slots != half.num_slots or not torch.allclose(
            torch.sort(b.weight).values, torch.sort(half.weight).values
        )


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_result(kind):
    x = tokens(T)
    outs = []
    for _ in range(2):
        r = router_for(kind, jitter_eps=0.1).train()
        outs.append(r(x, RouteKey(7)))
    same_assignment(outs[0], outs[1], atol=0)
    for name in outs[0].losses:
        assert torch.equal(outs[0].losses[name], outs[1].losses[name])


def test_generator_seeds_noise_when_no_seed_is_passed():
    x = tokens(T)
    res = []
    for seed in (5, 5, 6):
        r = router_for("switch", jitter_eps=0.2).train()
        r.generator = torch.Generator().manual_seed(seed)
        res.append(r(x).weight)
    assert torch.equal(res[0], res[1])
    assert not torch.equal(res[0], res[2])
