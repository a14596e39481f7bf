"""Eval mode routes as a deployment does: router.eval_capacity_factor (null = dropless, the
default) instead of capacity_factor, no input jitter, no random 2nd expert."""

from __future__ import annotations

import pytest
import torch

from moe_train.layer import MoELayer
from moe_train.routing import RouteKey, RouterConfig
from tests.helpers.routing import TOKEN_CHOICE, make_router, sorted_slots, tokens

T, GS = 64, 64


def route(router, x, key: int = 0):
    return router(x, RouteKey(key), group_size=GS)


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(sorted_slots(a), sorted_slots(b), strict=True))


@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_eval_is_dropless_by_default_and_training_keeps_its_capacity(kind):
    x = tokens(T)
    router = make_router(kind, capacity_factor=0.5, eval_capacity_factor=None, jitter_eps=0.0,
                         random_routing=False)  # fmt: skip
    dropless = make_router(kind, capacity_factor=None, jitter_eps=0.0, random_routing=False)
    assert int(route(router.train(), x).dropped) > 0
    a = route(router.eval(), x)
    assert int(a.dropped) == 0 and same(a, route(dropless.eval(), x))


@pytest.mark.parametrize("kind", TOKEN_CHOICE)
def test_an_eval_capacity_factor_routes_eval_as_training_with_that_capacity(kind):
    x = tokens(T)
    quiet = dict(jitter_eps=0.0, random_routing=False)
    evaluated = make_router(kind, capacity_factor=4.0, eval_capacity_factor=0.5, **quiet).eval()
    trained = make_router(kind, capacity_factor=0.5, **quiet).train()
    a = route(evaluated, x)
    assert int(a.dropped) > 0 and same(a, route(trained, x))


def test_expert_choice_keeps_its_c_in_eval_unless_given_one():
    x = tokens(T)
    router = make_router("expert_choice", capacity_factor=2.0, eval_capacity_factor=None)
    assert same(route(router.eval(), x), route(router.train(), x))  # no noise, the same c
    picky = make_router("expert_choice", capacity_factor=2.0, eval_capacity_factor=1.0).eval()
    assert route(picky, x).token.numel() == route(router.eval(), x).token.numel() // 2


@pytest.mark.parametrize(
    ("kind", "noise", "scale"),
    [("switch", {"jitter_eps": 0.5}, 0.3), ("topk", {"random_routing": True}, 3.0)],
)
def test_jitter_and_random_routing_are_off_in_eval(kind, noise, scale):
    # jitter changes choices of a near-uniform gate; random routing drops weak 2nd choices
    x = tokens(T, scale=scale)
    noisy = make_router(kind, capacity_factor=None, **noise)
    quiet = make_router(kind, capacity_factor=None, jitter_eps=0.0, random_routing=False)
    assert not same(route(noisy.train(), x, key=1), route(noisy.train(), x, key=2))  # it bites
    noisy.eval()
    assert same(route(noisy, x, key=1), route(noisy, x, key=2))
    assert same(route(noisy, x, key=1), route(quiet.eval(), x))


def test_a_model_layer_in_eval_drops_nothing():
    layer = MoELayer(16, 32, 8, router=RouterConfig(kind="topk", capacity_factor=0.5))
    x = torch.randn(2, 32, 16) * 3
    layer.train()(x)
    assert layer.last_stats["dropped_frac"] > 0
    layer.eval()(x)
    assert layer.last_stats["dropped_frac"] == 0
