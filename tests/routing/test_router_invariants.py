"""The invariants of every router's paper, on random inputs (eval mode, dropless)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_train.ops.hashing import counter_uniform, mix_seed
from moe_train.routing import RouteKey
from tests.helpers.routing import make_router, per_token, sorted_slots, tokens

T = 64


def gate_probs(router, x):
    with torch.no_grad():
        return torch.softmax(router.gate(x), dim=-1)


def test_switch_one_expert_weight_is_its_softmax_prob():
    r = make_router("switch").eval()
    x = tokens(T)
    a = r(x)
    probs = gate_probs(r, x)
    expert, weight = per_token(a, 1)
    assert torch.equal(expert[:, 0], probs.argmax(dim=-1))
    torch.testing.assert_close(weight[:, 0], probs.gather(1, expert).squeeze(1))
    assert len(set(expert[:, 0].tolist())) > 1  # random inputs do spread over experts


@pytest.mark.parametrize("k", [2, 3])
def test_topk_distinct_experts_renormalised_weights(k):
    r = make_router("topk", top_k=k).eval()
    x = tokens(T)
    a = r(x)
    probs = gate_probs(r, x)
    expert, weight = per_token(a, k)
    assert torch.all(expert[:, 1:] != expert[:, :-1])  # sorted, so distinct == strictly rising
    top_e = probs.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(expert, top_e)
    p = probs.gather(1, expert)
    torch.testing.assert_close(weight, p / p.sum(dim=-1, keepdim=True))
    torch.testing.assert_close(weight.sum(dim=-1), torch.ones(T))


def test_topk_random_routing_rule_is_2_g2_greater_than_u():
    """GShard: the 2nd choice is kept iff 2 * g2 > U(0,1), U keyed by (seed, global token)."""
    T_big, seed, offset = 2048, 1234, 77
    r = make_router("topk", top_k=2, random_routing=True).train()
    x = tokens(T_big, scale=6.0)
    a = r(x, RouteKey(seed, offset))
    probs = gate_probs(r, x)
    top_p, top_e = probs.topk(2, dim=-1)
    g = top_p / top_p.sum(dim=-1, keepdim=True)  # [T, 2] renormalised g1, g2

    tok, exp, w = sorted_slots(a)
    counts = torch.bincount(tok, minlength=T_big)
    assert torch.all(counts >= 1)  # first choices are never dropped by random routing
    has_first = torch.zeros(T_big, dtype=torch.bool)
    has_first[tok[exp == top_e[tok, 0]]] = True
    assert has_first.all()
    second = exp == top_e[tok, 1]
    kept2 = torch.zeros(T_big, dtype=torch.bool)
    kept2[tok[second]] = True
    # kept weights are still the renormalised ones
    torch.testing.assert_close(w[second], g[tok[second], 1])
    torch.testing.assert_close(w[~second], g[tok[~second], 0])

    # exact rule with the counter-based noise of ops/hashing.py (stream 2, index t*k + choice)
    u = counter_uniform(mix_seed(seed, 2), (offset + torch.arange(T_big)) * 2 + 1)
    assert torch.equal(kept2, 2 * g[:, 1] > u)
    # statistically: P(keep 2nd) = min(1, 2 g2); both outcomes occur
    expected = torch.clamp(2 * g[:, 1], max=1).mean()
    assert 0 < kept2.float().mean() < 1
    assert abs(kept2.float().mean() - expected) < 0.05
    # eval mode never drops a second choice
    r.eval()
    assert r(x).num_slots == 2 * T_big


def test_prototype_one_expert_per_prototype_softmax_inside_no_renorm():
    k, E = 2, 8
    n = E // k
    r = make_router("prototype", top_k=k).eval()
    x = tokens(T)
    a = r(x)
    with torch.no_grad():
        p = torch.softmax(r.gate(x).view(T, k, n), dim=-1)  # [T, k, n]
    expert, weight = per_token(a, k)
    for j in range(k):  # sorted by expert, so column j is prototype j
        assert torch.all((expert[:, j] >= j * n) & (expert[:, j] < (j + 1) * n))
        assert torch.equal(expert[:, j] - j * n, p[:, j].argmax(dim=-1))
        torch.testing.assert_close(weight[:, j], p[:, j].max(dim=-1).values)
    assert not torch.allclose(weight.sum(dim=-1), torch.ones(T))  # no renormalisation


def test_sam_experts_in_argmax_group_topk_inside_raw_probs():
    k, G, E = 2, 2, 8
    n = E // G
    r = make_router("sam", top_k=k, num_groups=G).eval()
    x = tokens(T)
    a = r(x)
    probs = gate_probs(r, x)  # includes the gate bias
    expert, weight = per_token(a, k)
    group = expert // n
    assert torch.all(group == group[:, :1])  # one group (device) per token
    best = probs.view(T, G, n).sum(dim=-1).argmax(dim=-1)
    assert torch.equal(group[:, 0], best)
    in_group = probs.view(T, G, n)[torch.arange(T), best]  # [T, n]
    top_local = in_group.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(expert - best.unsqueeze(1) * n, top_local)
    torch.testing.assert_close(weight, probs.gather(1, expert))  # raw global probabilities
    # over the batch every group gets chosen by some token
    assert len(set(best.tolist())) == G


@pytest.mark.parametrize("group_size", [None, 16])
def test_expert_choice_every_expert_holds_exactly_c_top_tokens(group_size):
    c, E = 1.3, 8  # C is not an integer: ceil
    r = make_router("expert_choice", capacity_factor=c, group_size=group_size).eval()
    x = tokens(T)
    a = r(x)
    probs = gate_probs(r, x)
    gs = group_size or T
    C = math.ceil(gs * c / E)
    G = T // gs
    assert a.dropped == 0 and a.num_slots == G * E * C
    keys = a.token * E + a.expert
    assert keys.unique().numel() == keys.numel()  # no (token, expert) pair twice
    bucket = (a.token // gs) * E + a.expert
    assert torch.equal(torch.bincount(bucket, minlength=G * E), torch.full((G * E,), C))
    torch.testing.assert_close(a.weight, probs[a.token, a.expert])
    chosen = torch.zeros(T, E, dtype=torch.bool)
    chosen[a.token, a.expert] = True
    for g in range(G):
        rows = slice(g * gs, (g + 1) * gs)
        s, m = probs[rows], chosen[rows]
        for e in range(E):  # the expert picked its top-C tokens of the group
            assert s[m[:, e], e].min() >= s[~m[:, e], e].max()


def test_expert_choice_max_experts_per_token():
    cap = 1
    r = make_router("expert_choice", capacity_factor=2.0, max_experts_per_token=cap).eval()
    x = tokens(T)
    full = make_router("expert_choice", capacity_factor=2.0).eval()
    full.load_state_dict(r.state_dict())
    a, b = r(x), full(x)
    assert torch.bincount(a.token, minlength=T).max() <= cap
    assert torch.bincount(b.token, minlength=T).max() > cap  # the cap did bind
    assert int(a.dropped) == b.num_slots - a.num_slots > 0
    # a capped token keeps its best pick among those the experts made
    best = torch.full((T,), -1.0)
    best.scatter_reduce_(0, b.token, b.weight, reduce="amax")
    torch.testing.assert_close(a.weight, best[a.token])


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("gate", ["straight_through", "sigmoid"])
def test_tree_path_from_sign_bits(depth, gate):
    r = make_router("tree", tree_depth=depth, tree_gate=gate).eval()
    assert r.num_experts == 2 ** (depth + 1) - 1
    x = tokens(T)
    a = r(x)
    with torch.no_grad():
        z = r.gate(x)  # [T, depth] gating units
    expert, weight = per_token(a, depth + 1)  # heap ids grow with depth: column = level
    node = torch.zeros(T, dtype=torch.long)
    assert torch.equal(expert[:, 0], node)
    for level in range(depth):
        parent = expert[:, level]
        assert torch.all(
            (expert[:, level + 1] == 2 * parent + 1) | (expert[:, level + 1] == 2 * parent + 2)
        )
        node = 2 * node + 1 + (z[:, level] > 0).long()
        assert torch.equal(expert[:, level + 1], node)
    if gate == "straight_through":
        assert torch.equal(weight, torch.ones_like(weight))
    else:
        torch.testing.assert_close(weight[:, 0], torch.ones(T))
        torch.testing.assert_close(weight[:, 1:], torch.sigmoid(z.abs()))
    assert len(set(expert[:, -1].tolist())) > 1


def test_tree_straight_through_gradient_is_the_sigmoid_gradient():
    """Straight-through: forward weights 1, backward as the branch probabilities."""
    st = make_router("tree", tree_gate="straight_through").eval()
    sg = make_router("tree", tree_gate="sigmoid").eval()
    sg.load_state_dict(st.state_dict())
    x = tokens(T)
    a, b = st(x), sg(x)
    (a.weight.sum()).backward()
    (b.weight.sum()).backward()
    assert st.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(st.gate.weight.grad, sg.gate.weight.grad)
