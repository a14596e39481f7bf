"""Routers at their edges: no tokens, ties, exact capacity, degenerate k, normalisation order."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.routing import RouteContext, RouteKey, RouterConfig, build_router
from moe_train.routing.capacity import expert_capacity
from moe_train.routing.select import topk_lowest_index
from tests.helpers.routing import D_MODEL, KINDS, make_router, per_token, tokens

# ---- zero tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_tokens_give_an_empty_assignment_and_zero_losses(kind, group_size):
    r = make_router(kind, group_size=group_size).train()
    names = set(r(tokens(32), RouteKey(1)).losses)  # the losses of a non-empty call
    a = r(torch.randn(0, D_MODEL), RouteKey(1), group_size=16)
    assert (a.num_tokens, a.num_slots, a.requested, int(a.dropped)) == (0, 0, 0, 0)
    assert a.token.dtype == a.expert.dtype == torch.int64 and a.weight.dtype == torch.float32
    assert torch.equal(a.expert_load, torch.zeros(r.num_experts, dtype=torch.int64))
    assert set(a.losses) == names and set(names) == set(r.loss_names())
    assert all(float(v.detach()) == 0.0 for v in a.losses.values())
    sum(a.losses.values()).backward()  # connected to the gate: zero gradient, not none
    assert r.gate.weight.grad is not None and not r.gate.weight.grad.any()


def test_routing_state_is_not_stored_on_the_module():
    r = make_router("topk", random_routing=True).train()
    r(tokens(32), RouteKey(3, 64))
    assert not hasattr(r, "noise_seed") and not hasattr(r, "token_offset")


# ---- ties -------------------------------------------------------------------------------------


def zero_logit_router(kind, **kw):
    r = make_router(kind, **kw).eval()
    if r.gate.bias is not None:
        torch.nn.init.zeros_(r.gate.bias)
    return r


@pytest.mark.parametrize(
    "kind,kw,first_experts",
    [
        ("switch", {}, [0]),
        ("topk", {"top_k": 2}, [0, 1]),
        ("topk", {"top_k": 3}, [0, 1, 2]),
        ("prototype", {"top_k": 2}, [0, 4]),  # the first expert of each prototype
        ("sam", {"top_k": 2, "num_groups": 2}, [0, 1]),  # the first group, its first experts
        ("tree", {"tree_depth": 2}, [0, 1, 3]),  # z = 0 goes left
    ],
)
def test_all_zero_logits_pick_the_lowest_experts(kind, kw, first_experts):
    """Padding rows (all-zero logits) all go to the lowest-indexed experts, on any device."""
    r = zero_logit_router(kind, **kw)
    k = len(first_experts)
    expert, _ = per_token(r(torch.zeros(16, D_MODEL)), k)
    assert torch.equal(expert, torch.tensor(first_experts).expand(16, k))


@pytest.mark.parametrize("group_size", [None, 8])
def test_expert_choice_ties_pick_the_earliest_tokens(group_size):
    r = zero_logit_router("expert_choice", capacity_factor=2.0, group_size=group_size)
    a = r(torch.zeros(32, D_MODEL))
    gs = group_size or 32
    C = math.ceil(gs * 2.0 / r.num_experts)
    expected = torch.cat([g * gs + torch.arange(C) for g in range(32 // gs)])
    for e in range(r.num_experts):
        assert torch.equal(torch.sort(a.token[a.expert == e]).values, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim,k", [(-1, 3), (0, 5), (1, 1)])
def test_topk_lowest_index_is_a_stable_descending_sort(dtype, dim, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 3, (12, 10, 7), generator=g).to(dtype) / 2  # many ties, signs, zeros
    x[0, 0, :] = -0.0
    values, indices = topk_lowest_index(x, k, dim)
    ref_v, ref_i = torch.sort(x.float(), dim=dim, descending=True, stable=True)
    assert torch.equal(indices, ref_i.narrow(dim, 0, k))
    assert torch.equal(values.float(), ref_v.narrow(dim, 0, k))
    assert values.dtype == dtype


def test_topk_lowest_index_passes_the_gradient_to_the_picked_entries():
    x = torch.tensor([[0.5, 0.9, 0.9, 0.1]], requires_grad=True)
    values, indices = topk_lowest_index(x, 2)
    assert indices.tolist() == [[1, 2]]
    values.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


# ---- exact capacity ---------------------------------------------------------------------------


def test_capacity_is_exact_decimal_arithmetic():
    assert expert_capacity(200, 1, 4, 1.1) == 55  # the float product is 55.000000000000007
    for tokens_, k, E in ((200, 1, 4), (96, 2, 12), (1000, 2, 64), (7, 3, 5)):
        for hundredths in range(5, 400, 5):
            factor = hundredths / 100
            exact = math.ceil(Fraction(tokens_ * k, E) * Fraction(hundredths, 100))
            assert expert_capacity(tokens_, k, E, factor) == max(1, exact)


@pytest.mark.parametrize("kind", ["switch", "expert_choice"])
def test_router_keeps_exactly_the_exact_capacity(kind):
    """200 tokens all tied, 4 experts, factor 1.1: 55 slots per expert, not 56."""
    r = zero_logit_router(kind, num_experts=4, capacity_factor=1.1)
    a = r(torch.zeros(200, D_MODEL))
    expected = [55, 0, 0, 0] if kind == "switch" else [55] * 4
    assert a.expert_load.tolist() == expected


def test_tree_node_capacity_is_exact():
    r = zero_logit_router("tree", tree_depth=2, capacity_factor=1.1)  # all tokens: nodes 0, 1, 3
    a = r(torch.zeros(200, D_MODEL))
    assert a.expert_load[[0, 1, 3]].tolist() == [200, 110, 55]  # ceil(200 / 2^l * 1.1)


# ---- degenerate k -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,kw", [("topk", {"top_k": 1}), ("prototype", {"top_k": 8})], ids=["topk1", "proto=E"]
)
def test_weight_one_configs_warn_naming_switch(kind, kw):
    with pytest.warns(UserWarning, match=r"router\.top_k: .*router\.kind=switch"):
        r = build_router(RouterConfig(kind=kind, **kw), D_MODEL, 8)
    a = r(tokens(16))
    assert torch.all(a.weight == 1.0)  # why: the weights carry no gradient to the gate


def test_ordinary_configs_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind, kw in (("topk", {"top_k": 2}), ("prototype", {"top_k": 4})):
            build_router(RouterConfig(kind=kind, **kw), D_MODEL, 8)


# ---- normalisation before or after drops ------------------------------------------------------


def topk_pair(**kw):
    """Two topk routers with the same gate: normalize before_drop and after_drop."""
    kw = {"top_k": 2, "capacity_factor": 0.5, "group_size": 16, "drop_policy": "position", **kw}
    before = make_router("topk", normalize="before_drop", **kw)
    after = make_router("topk", normalize="after_drop", **kw)
    after.load_state_dict(before.state_dict())
    return before, after


def check_normalisation(a, b, probs):
    """a: before_drop, b: after_drop, same slots. Tokens with both slots: equal weights; a lone
    survivor: g1/(g1+g2) before, 1.0 after."""
    assert torch.equal(a.token, b.token) and torch.equal(a.expert, b.expert)
    counts = torch.bincount(a.token, minlength=a.num_tokens)
    lone = counts[a.token] == 1
    assert lone.any() and (~lone).any()
    torch.testing.assert_close(b.weight[lone], torch.ones(int(lone.sum())))
    torch.testing.assert_close(a.weight[~lone], b.weight[~lone])
    top2 = probs.topk(2, dim=-1).values.sum(dim=-1)
    torch.testing.assert_close(a.weight[lone], probs[a.token, a.expert][lone] / top2[a.token][lone])


def test_normalize_after_capacity_drops():
    before, after = topk_pair()
    x = tokens(64)
    a, b = before.eval()(x), after.eval()(x)
    check_normalisation(a, b, torch.softmax(before.gate(x), -1).detach())
    sum(b.weight).backward()
    assert torch.isfinite(after.gate.weight.grad).all()


def test_normalize_after_random_routing_drops():
    before, after = topk_pair(random_routing=True, capacity_factor=None)
    x = tokens(64, scale=6.0)
    a, b = before.train()(x, RouteKey(5)), after.train()(x, RouteKey(5))
    check_normalisation(a, b, torch.softmax(before.gate(x), -1).detach())


def test_normalize_names_its_field():
    with pytest.raises(ValueError, match=r"router\.normalize: got 'never'"):
        build_router(RouterConfig(kind="topk", normalize="never"), D_MODEL, 8)


# ---- no host sync in the capacity mask --------------------------------------------------------


class CountSyncs(TorchDispatchMode):
    """Counts device -> host reads (`.item()`, `int(tensor)`)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_capacity_mask_reads_nothing_back_to_the_host():
    r = make_router("switch", capacity_factor=0.5)
    T, gs = 64, 16
    token = torch.arange(T)
    expert = torch.randint(0, r.num_experts, (T,))
    priority = torch.rand(T)
    ctx = RouteContext(T, gs, RouteKey(0, 0))
    with CountSyncs() as mode:
        keep = r.keep(token, expert, priority, r.capacity(gs, 1), ctx)
    assert mode.syncs == 0
    assert keep.sum() < T  # the mask did bind
