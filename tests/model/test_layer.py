"""MoELayer: output equals a naive per-token loop over the router's Assignment."""

from __future__ import annotations

import pytest
import torch

from moe_train import MoELayer, RouteKey, RouterConfig
from tests.helpers.routing import KINDS

D, H, E = 16, 24, 8


def make_layer(kind, activation="gelu", **kw):
    base = dict(
        kind=kind, top_k=2, num_groups=2, capacity_factor=2.0 if kind == "expert_choice" else 0.75
    )
    base.update(kw)
    cfg = RouterConfig(**base)
    layer = MoELayer(D, H, cfg.num_experts_for(E), router=cfg, activation=activation, init_std=0.2)
    seen = []
    layer.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    return layer, seen


def naive(layer, tokens, a):
    """y[t] = sum over t's slots of weight * expert(x[t]), one token at a time."""
    y = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for s in (a.token == t).nonzero().flatten().tolist():
            e = int(a.expert[s])
            y[t] += a.weight[s] * layer.experts.expert_ffn(tokens[t : t + 1], e)[0]
    return y


@pytest.mark.parametrize("shape", [(24, D), (3, 8, D)])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_naive_loop(kind, shape):
    layer, seen = make_layer(kind, activation="swiglu" if kind == "sam" else "gelu")
    layer.train()  # noise on: the hook gives us the very Assignment the layer used
    x = torch.randn(*shape)
    y, losses = layer(x, RouteKey(11))
    assert y.shape == x.shape
    (a,) = seen
    tokens = x.reshape(-1, D)
    want = naive(layer, tokens, a).reshape(shape)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    assert losses is a.losses
    # tokens without a slot (dropped everywhere) get zeros: the model's residual carries them
    lost = torch.bincount(a.token, minlength=tokens.shape[0]) == 0
    assert torch.all(y.reshape(-1, D)[lost] == 0)


def test_3d_input_routes_per_sequence():
    layer, seen = make_layer("expert_choice")
    layer.eval()
    x = torch.randn(2, 8, D)
    y, _ = layer(x)
    y0, _ = layer(x[:1])
    y1, _ = layer(x[1:])
    torch.testing.assert_close(y, torch.cat([y0, y1]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_last_stats(kind):
    layer, seen = make_layer(kind)
    x = torch.randn(2, 8, D)
    layer(x)
    (a,) = seen
    stats = layer.last_stats
    assert {"load_cv", "load_min", "load_max", "dropped_frac", "tokens", "slots"} <= set(stats)
    assert stats["tokens"] == 16
    assert stats["slots"] == a.num_slots
    assert stats["dropped_frac"] == pytest.approx(float(a.dropped) / a.requested)
    assert stats["load_max"] == float(a.expert_load.max())
    assert torch.equal(layer.last_load, a.expert_load)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_router_and_every_used_expert(kind):
    layer, seen = make_layer(kind)
    layer.train()
    x = torch.randn(2, 16, D, requires_grad=True)
    y, losses = layer(x, RouteKey(3))
    (y.square().sum() + sum(losses.values())).backward()
    (a,) = seen
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    for e in range(layer.num_experts):
        used = int(a.expert_load[e]) > 0
        assert (layer.experts.w_in.grad[e].abs().sum() > 0) == used
        assert (layer.experts.w_out.grad[e].abs().sum() > 0) == used


def test_expert_with_zero_tokens_forward_and_backward():
    layer, seen = make_layer("switch", capacity_factor=None)
    with torch.no_grad():  # x > 0 and a strongly negative row: expert 0 is never chosen
        layer.router.gate.weight[0] = -1.0
    x = (torch.rand(32, D) + 0.1).requires_grad_()
    y, losses = layer(x)
    (a,) = seen
    assert int(a.expert_load[0]) == 0 and (a.expert_load > 0).sum() > 1
    (y.sum() + sum(losses.values())).backward()
    assert torch.isfinite(y).all()
    assert layer.experts.w_in.grad is not None
    assert torch.all(layer.experts.w_in.grad[0] == 0) and torch.all(
        layer.experts.w_out.grad[0] == 0
    )
    used = int(a.expert[0])
    assert layer.experts.w_in.grad[used].abs().sum() > 0


def test_all_tokens_dropped_still_backprops():
    """Expert choice with one pick per expert and a tiny c can leave most tokens unrouted; the
    layer must still run with whatever remains."""
    layer, seen = make_layer("expert_choice", capacity_factor=0.01)
    x = torch.randn(64, D, requires_grad=True)
    y, losses = layer(x)
    (a,) = seen
    assert a.num_slots == layer.num_experts  # C = 1
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_same_seed_same_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        layer, _ = make_layer("topk", jitter_eps=0.1)
        layer.train()
        x = torch.randn(2, 8, D)
        outs.append(layer(x, RouteKey(9))[0])
    assert torch.equal(outs[0], outs[1])
