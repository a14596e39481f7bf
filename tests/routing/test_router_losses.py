"""Aux losses equal their formulas, computed here by hand, with the coefficients applied."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.routing import KINDS, make_router, tokens

T, GS = 48, 16
G = T // GS
COEF = dict(balance_coef=0.3, z_loss_coef=0.07, alignment_coef=0.5)


def switch_balance(probs, choice):
    """E * sum_i f_i P_i per routing group of GS tokens, averaged over the groups."""
    E = probs.shape[1]
    total = 0.0
    for g in range(G):
        p, c = probs[g * GS : (g + 1) * GS], choice[g * GS : (g + 1) * GS]
        f = torch.bincount(c, minlength=E).float() / GS
        total = total + E * (f * p.mean(dim=0)).sum()
    return total / G


def zloss(logits):
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()


def route(kind, **kw):
    r = make_router(
        kind, group_size=GS, capacity_factor=0.5 if kind != "expert_choice" else 2.0, **COEF, **kw
    ).eval()
    x = tokens(T)
    a = r(x)
    return r, x, a


def test_switch_losses():
    r, x, a = route("switch")
    logits = r.gate(x)
    probs = torch.softmax(logits, -1)
    assert set(a.losses) == {"balance", "z"}
    torch.testing.assert_close(a.losses["balance"], 0.3 * switch_balance(probs, probs.argmax(-1)))
    torch.testing.assert_close(a.losses["z"], 0.07 * zloss(logits))


def test_topk_balance_on_first_choices():
    r, x, a = route("topk", top_k=2)
    logits = r.gate(x)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(a.losses["balance"], 0.3 * switch_balance(probs, probs.argmax(-1)))
    torch.testing.assert_close(a.losses["z"], 0.07 * zloss(logits))


def test_prototype_balance_summed_over_prototypes():
    k, E = 2, 8
    n = E // k
    r, x, a = route("prototype", top_k=k)
    logits = r.gate(x).view(T, k, n)
    want = sum(
        switch_balance(torch.softmax(logits[:, j], -1), logits[:, j].argmax(-1)) for j in range(k)
    )
    torch.testing.assert_close(a.losses["balance"], 0.3 * want)
    # z-loss averaged over prototypes (documented in prototype.py)
    torch.testing.assert_close(a.losses["z"], 0.07 * zloss(logits))


def sam_reference(r, x, k, Gd):
    logits = r.gate(x)
    probs = torch.softmax(logits, -1)
    E = probs.shape[1]
    n = E // Gd
    d_star = probs.view(T, Gd, n).sum(-1).argmax(-1)
    inside = probs.view(T, Gd, n)[torch.arange(T), d_star]
    top_p, top_l = inside.topk(k, -1)
    experts = d_star.unsqueeze(1) * n + top_l
    balance = sum(switch_balance(probs, experts[:, j]) for j in range(k))
    # alignment (sam.py): mean_t sum_{e not in d*} max(0, g_e - g_{e_k}), g_{e_k} detached
    outside = (torch.arange(E).unsqueeze(0) // n) != d_star.unsqueeze(1)
    weakest = top_p[:, -1:].detach()
    alignment = (torch.clamp(probs - weakest, min=0) * outside).sum(-1).mean()
    return balance, alignment, zloss(logits)


def test_sam_losses_and_alignment_gradient():
    k, Gd = 2, 4
    r, x, a = route("sam", top_k=k, num_groups=Gd)
    balance, alignment, z = sam_reference(r, x, k, Gd)
    assert set(a.losses) == {"balance", "alignment", "z"}
    torch.testing.assert_close(a.losses["balance"], 0.3 * balance)
    torch.testing.assert_close(a.losses["alignment"], 0.5 * alignment)
    torch.testing.assert_close(a.losses["z"], 0.07 * z)
    assert alignment > 0  # some out-of-group expert beats the weakest chosen one
    # gradient: only through the out-of-group probabilities (the weakest chosen one is detached)
    (g_lib,) = torch.autograd.grad(a.losses["alignment"], r.gate.weight)
    (g_ref,) = torch.autograd.grad(0.5 * alignment, r.gate.weight)
    torch.testing.assert_close(g_lib, g_ref)


def test_tree_balance_per_level():
    depth = 3
    r, x, a = route("tree", tree_depth=depth)
    z = r.gate(x)  # [T, depth]
    right = torch.sigmoid(z)
    total = 0.0
    for level in range(1, depth + 1):
        n = 2**level
        # probability of reaching node i of this level: product over its branch bits (MSB first)
        reach = torch.ones(T, n)
        for i in range(n):
            for m in range(level):
                bit = (i >> (level - 1 - m)) & 1
                reach[:, i] = reach[:, i] * (right[:, m] if bit else 1 - right[:, m])
        chosen = torch.zeros(T, dtype=torch.long)
        for m in range(level):
            chosen = 2 * chosen + (z[:, m] > 0).long()
        total = total + switch_balance(reach, chosen)  # n * sum_i f_i P_i over this level
    torch.testing.assert_close(a.losses["balance"], 0.3 * total)
    # z-loss of each unit's 2-way softmax over (-z/2, z/2): logsumexp = log(2 cosh(z/2))
    torch.testing.assert_close(a.losses["z"], 0.07 * (torch.log(2 * torch.cosh(z / 2)) ** 2).mean())


def test_expert_choice_has_only_z_loss():
    r, x, a = route("expert_choice")
    assert set(a.losses) == {"z"}
    torch.testing.assert_close(a.losses["z"], 0.07 * zloss(r.gate(x)))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_coefficients_switch_losses_off(kind):
    r = make_router(kind, balance_coef=0.0, z_loss_coef=0.0, alignment_coef=0.0).eval()
    a = r(tokens(T))
    assert all(float(v.detach()) == 0.0 for v in a.losses.values())
    assert "z" not in a.losses
