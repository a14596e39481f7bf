"""The current generation's topk options: group-limited choices, sigmoid / normalize_topk /
route_scale weights, the planner's traffic term, and bad input named at start."""

from __future__ import annotations

import math

import pytest
import torch

from moe_train.routing import RouterConfig, build_router, router_class
from moe_train.routing.groups import best_groups

E, D = 16, 12


def topk(**fields) -> RouterConfig:
    return RouterConfig(kind="topk", capacity_factor=None, random_routing=False, **fields)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_tokens_use_at_most_topk_groups_groups_their_best(score):
    cfg = topk(top_k=4, num_groups=4, topk_groups=2, score=score)
    router = build_router(cfg, D, E)
    x = torch.randn(64, D)
    a = router(x)
    groups = (a.expert // (E // 4)).view(64, 4)
    assert max(len(set(g.tolist())) for g in groups) <= 2
    assert max(len(set(g.tolist())) for g in groups) == 2  # not trivially one group
    scores = router.scores(router.logits(x))
    top2 = scores.view(64, 4, 4).topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3's group score
    best = set(map(tuple, top2.topk(2, dim=-1).indices.sort(dim=1).values.tolist()))
    used = {tuple(sorted(set(g.tolist()))) for g in groups}
    assert all(any(set(u) <= set(b) for b in best) for u in used)


def test_sam_device_choice_is_the_shared_group_helper_with_one_group():
    sam = build_router(RouterConfig(kind="sam", num_groups=4, capacity_factor=None), D, E)
    x = torch.randn(40, D)
    probs = torch.softmax(sam.logits(x), -1)
    device = best_groups(probs, 4, 1).squeeze(1)
    assert torch.equal(device, probs.view(40, 4, 4).sum(-1).argmax(-1))
    assert torch.equal(sam(x).expert.view(40, 2) // 4, device.unsqueeze(1).expand(40, 2))


def test_weights_sigmoid_raw_and_scaled():
    x = torch.randn(20, D)
    raw = build_router(topk(score="sigmoid", normalize_topk=False, route_scale=2.5), D, E)
    a = raw(x)
    s = torch.sigmoid(raw.logits(x))
    torch.testing.assert_close(a.weight, 2.5 * s[a.token, a.expert])
    norm = build_router(topk(score="sigmoid"), D, E)
    norm.load_state_dict(raw.state_dict())
    b = norm(x)
    assert torch.equal(a.expert, b.expert)
    total = torch.zeros(20).index_add(0, b.token, b.weight)
    torch.testing.assert_close(total, torch.ones(20))


def test_expected_ranks_of_group_limited_routing_at_most_topk_groups():
    cls = router_class("topk")
    for G, g, ep in [(8, 1, 8), (8, 2, 8), (8, 2, 4), (4, 2, 8), (16, 3, 4)]:
        cfg = topk(top_k=4, num_groups=G, topk_groups=g)
        ranks = cls.expected_ranks(cfg, 64, ep)
        bound = g if G % ep == 0 else g * ep // G
        assert 1 <= ranks <= bound + 1e-12, (G, g, ep, ranks)
        assert ranks < cls.expected_ranks(topk(top_k=4), 64, ep)
    # one group per rank, two groups kept, k=2: 2 ranks unless both picks fall in one group
    two = cls.expected_ranks(topk(top_k=2, num_groups=8, topk_groups=2), 64, 8)
    assert two == pytest.approx(1 + 8 / 15)  # P(the 2nd pick is in the other group) = 8/15


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(num_groups=4, topk_groups=5), "router.topk_groups"),
        (dict(num_groups=3, topk_groups=1), "router.num_groups"),
        (dict(num_groups=4, topk_groups=1, top_k=5), "router.top_k"),
        (dict(bias_update_rate=-1e-3), "router.bias_update_rate"),
        (dict(bias_update_rate=math.nan), "router.bias_update_rate"),
        (dict(bias_update_rate=math.inf), "router.bias_update_rate"),
        (dict(route_scale=0.0), "router.route_scale"),
        (dict(score="tanh"), "router.score"),
    ],
)
def test_bad_topk_options_named_at_start(fields, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        topk(**fields).validate(E)


@pytest.mark.parametrize("kind", ["switch", "sam", "prototype", "expert_choice"])
def test_sigmoid_refused_by_routers_that_need_a_softmax_saying_why(kind):
    cfg = RouterConfig(kind=kind, score="sigmoid", num_groups=2, capacity_factor=2.0)
    with pytest.raises(ValueError, match=rf"router\.score: router\.kind={kind}.*softmax"):
        cfg.validate(E)
    for field, value in [("bias_update_rate", 1e-3), ("topk_groups", 1), ("route_scale", 2.0)]:
        cfg = RouterConfig(kind=kind, num_groups=2, capacity_factor=2.0, **{field: value})
        with pytest.raises(ValueError, match=rf"router\.{field}"):
            cfg.validate(E)


def test_groups_that_do_not_fit_ep_refused():
    cls = router_class("topk")
    cls.check_layout(topk(num_groups=8, topk_groups=2), 4)  # 2 groups a rank
    cls.check_layout(topk(num_groups=2, topk_groups=1), 4)  # a group = 2 ranks (a node)
    with pytest.raises(ValueError, match=r"router\.num_groups=6 does not fit parallel\.ep=4"):
        cls.check_layout(topk(num_groups=6, topk_groups=2), 4)
