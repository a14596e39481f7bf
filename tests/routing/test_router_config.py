"""Bad configurations fail with a ValueError naming the field; gates get gradients."""

from __future__ import annotations

import pytest
import torch

from moe_train.routing import RouteKey, RouterConfig, build_router
from tests.helpers.routing import KINDS, make_router, tokens


@pytest.mark.parametrize(
    "kw,num_experts,field",
    [
        ({"kind": "topk", "top_k": 9}, 8, "top_k"),
        ({"kind": "sam", "top_k": 3, "num_groups": 4}, 8, "top_k"),  # > 8/4 experts per group
        ({"kind": "sam", "num_groups": 3}, 8, "num_groups"),
        ({"kind": "prototype", "top_k": 3}, 8, "top_k"),
        ({"kind": "topk", "top_k": 0}, 8, "top_k"),
        ({"kind": "switch", "capacity_factor": -1.0}, 8, "capacity_factor"),
        ({"kind": "switch", "capacity_factor": 0.0}, 8, "capacity_factor"),
        ({"kind": "switch", "balance_coef": -0.1}, 8, "balance_coef"),
        ({"kind": "switch", "z_loss_coef": -1e-3}, 8, "z_loss_coef"),
        ({"kind": "sam", "alignment_coef": -1.0}, 8, "alignment_coef"),
        ({"kind": "switch", "init_scale": -0.1}, 8, "init_scale"),
        ({"kind": "switch", "jitter_eps": -0.01}, 8, "jitter_eps"),
        ({"kind": "switch", "group_size": 0}, 8, "group_size"),
        ({"kind": "expert_choice", "capacity_factor": None}, 8, "capacity_factor"),
        ({"kind": "expert_choice", "max_experts_per_token": 0}, 8, "max_experts_per_token"),
        ({"kind": "switch", "drop_policy": "random"}, 8, "drop_policy"),
        ({"kind": "tree", "tree_gate": "tanh"}, 7, "tree_gate"),
        ({"kind": "tree", "tree_depth": 0}, 1, "tree_depth"),
        ({"kind": "switch", "router_dtype": "bfloat16"}, 8, "router_dtype"),
        ({"kind": "switch", "capacity_factor": float("nan")}, 8, "capacity_factor"),
        ({"kind": "switch", "z_loss_coef": float("nan")}, 8, "z_loss_coef"),
        ({"kind": "switch", "jitter_eps": float("inf")}, 8, "jitter_eps"),
        ({"kind": "topk", "normalize": "later"}, 8, "normalize"),
        ({"kind": "bogus"}, 8, "kind"),
        ({"kind": "tree", "tree_depth": 2}, 8, "num_experts"),  # the depth-2 tree has 7 nodes
    ],
)
def test_bad_config_raises_naming_the_field(kw, num_experts, field):
    with pytest.raises(ValueError, match=rf"\.{field}\b"):
        build_router(RouterConfig(**kw), 16, num_experts)


def test_bad_config_error_lists_allowed_kinds():
    with pytest.raises(ValueError, match="expert_choice"):
        build_router(RouterConfig(kind="bogus"), 16, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_group_size_must_divide_the_tokens(kind):
    r = make_router(kind, group_size=16)
    with pytest.raises(ValueError, match="group_size"):
        r(tokens(24))
    with pytest.raises(ValueError, match="group_size"):
        make_router(kind)(tokens(24), group_size=16)


def test_wrong_input_shape_raises():
    r = make_router("switch")
    with pytest.raises(ValueError):
        r(torch.randn(4, 2, 16))
    with pytest.raises(ValueError):
        r(torch.randn(4, 15))


@pytest.mark.filterwarnings("ignore:router.top_k")  # one expert per prototype: weight 1.0
@pytest.mark.parametrize("kind", KINDS)
def test_valid_edge_configs_build(kind):
    """The limits themselves are allowed (top_k = experts per group, one expert per prototype)."""
    kw = {"top_k": 4, "num_groups": 2} if kind == "sam" else {}
    if kind in ("topk", "prototype"):
        kw = {"top_k": 8}
    r = make_router(kind, **kw).eval()
    a = r(tokens(16))
    assert a.num_slots > 0


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gate_gets_gradient_from_weights_and_losses(kind, train):
    r = make_router(kind, capacity_factor=None if kind != "expert_choice" else 2.0).train(train)
    a = r(tokens(32), RouteKey(1))
    (g_w,) = torch.autograd.grad(a.weight.square().sum(), r.gate.weight, retain_graph=True)
    assert torch.isfinite(g_w).all() and g_w.abs().sum() > 0
    total = sum(a.losses.values())
    (g_l,) = torch.autograd.grad(total, r.gate.weight)
    assert torch.isfinite(g_l).all() and g_l.abs().sum() > 0
