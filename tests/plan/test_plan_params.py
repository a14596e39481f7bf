"""plan/params.py: the closed-form count against the real module and the published totals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_train.model import ModelConfig, MoETransformer
from moe_train.plan import EncDecConfig, count_params
from moe_train.routing import RouterConfig
from tests.helpers.plan import SMALL, model_cfg

ROUTERS = [
    RouterConfig(kind="switch"),
    RouterConfig(kind="topk", top_k=2),
    RouterConfig(kind="prototype", top_k=2),
    RouterConfig(kind="sam", top_k=2, num_groups=2),  # gate with bias
    RouterConfig(kind="expert_choice", capacity_factor=2.0),
    RouterConfig(kind="tree", tree_depth=2),  # 2 gate units, 7 node experts
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r.kind)
@pytest.mark.parametrize(
    "model",
    [
        SMALL,
        replace(SMALL, activation="swiglu", tie_embeddings=False, moe_every=1),
        replace(SMALL, expert_d_ff=40, moe_every=3),
        replace(SMALL, activation="swiglu", shared_experts=2, shared_d_ff=24, shared_gate=True),
    ],
    ids=["gelu", "swiglu-untied-all-moe", "expert_d_ff", "shared-experts"],
)
def test_count_equals_module_exactly(model: ModelConfig, router: RouterConfig) -> None:
    torch.manual_seed(0)
    module = MoETransformer(replace(model), replace(router))
    real = module.num_params()
    pc = count_params(model, router)
    assert (pc.dense, pc.experts, pc.total) == (real["dense"], real["expert"], real["total"])
    # the same as the sum over the module's (deduplicated) parameters
    assert pc.total == sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@pytest.mark.parametrize(
    "name,published,encdec",
    [
        ("switch_c", 1571e9, EncDecConfig(d_kv=64)),
        ("switch_xxl", 395e9, EncDecConfig()),
    ],
)
def test_published_totals_within_one_percent(
    name: str, published: float, encdec: EncDecConfig
) -> None:
    model = model_cfg(name)
    enc = count_params(model, RouterConfig(kind="switch"), "encoder_decoder", encdec)
    assert abs(enc.total / published - 1) < 0.01
    dec = count_params(model, RouterConfig(kind="switch"))  # our decoder-only equivalent
    assert abs(dec.total / published - 1) < 0.01
    assert enc.experts == dec.experts  # same experts; only attention/norm/embedding terms differ


def test_m6t_is_about_a_trillion() -> None:
    pc = count_params(model_cfg("m6t_1t"), RouterConfig(kind="prototype", top_k=2))
    assert 1.0e12 <= pc.total < 1.01e12


def test_bad_architecture_and_encoder_layers_are_named() -> None:
    with pytest.raises(ValueError, match=r"plan\.architecture"):
        count_params(SMALL, RouterConfig(), "encoder_only")
    with pytest.raises(ValueError, match=r"plan\.encoder_decoder\.encoder_layers"):
        count_params(SMALL, RouterConfig(), "encoder_decoder", EncDecConfig(encoder_layers=3))


def test_state_bytes_count_the_balancing_bias_as_the_planner_does() -> None:
    from moe_train.config import TrainConfig
    from moe_train.parallel.memory import buffer_bytes, state_bytes
    from moe_train.plan import ClusterConfig, PlanOptions, make_plan

    cfg = TrainConfig(model=replace(SMALL, moe_every=1))
    cfg.router = RouterConfig(kind="topk", bias_update_rate=1e-3)
    module = MoETransformer(replace(cfg.model), replace(cfg.router))
    E, L = SMALL.num_experts, SMALL.n_layers
    assert buffer_bytes(module) == 4 * E * L  # one fp32 [E] bias per MoE layer
    optimizer = torch.optim.AdamW(module.parameters())
    assert state_bytes(module, optimizer)["buffers"] == 4 * E * L
    plan = make_plan(cfg, ClusterConfig(world_size=1), PlanOptions(compare_routers=False))
    cfg.router = RouterConfig(kind="topk")
    without = make_plan(cfg, ClusterConfig(world_size=1), PlanOptions(compare_routers=False))
    assert plan["state_bytes_per_gpu"] - without["state_bytes_per_gpu"] == 4 * E * L
