"""plan/meta_check.py: one rank's real model on the meta device equals the closed-form count."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_train.model import MoETransformer
from moe_train.parallel import ExpertShard
from moe_train.plan import build_one_rank, count_params, meta_check, meta_count
from moe_train.routing import RouterConfig
from tests.helpers.plan import SMALL, model_cfg


def test_one_rank_build_holds_its_share_of_experts() -> None:
    """Without a process group, rank 1 of ep=4 holds E/4 experts per layer, dense replicated."""
    pc = count_params(SMALL, RouterConfig())
    module = build_one_rank(SMALL, RouterConfig(), 4, rank=1)
    counts = module.num_params()
    assert counts["dense"] == pc.dense and counts["expert"] == pc.experts // 4
    assert module.moe_layers()[0].experts.first_expert == 2
    # the same as the trainer's build with that shard, on the CPU
    cpu = MoETransformer(replace(SMALL), RouterConfig(), shard=ExpertShard(4, 1))
    assert cpu.num_params() == counts
    assert MoETransformer(replace(SMALL), RouterConfig()).num_params()["expert"] == pc.experts


@pytest.mark.parametrize(
    "name,router,ep",
    [
        ("switch_c", RouterConfig(kind="switch"), 2048),
        ("m6t_1t", RouterConfig(kind="prototype", top_k=2), 480),
        ("switch_xxl", RouterConfig(kind="switch"), 128),
    ],
)
def test_meta_count_equals_analytic_for_big_models(
    name: str, router: RouterConfig, ep: int
) -> None:
    model = model_cfg(name)
    pc = count_params(model, router)
    mc = meta_count(model, router, ep)
    assert mc["dense"] == pc.dense
    assert mc["expert"] == pc.experts // ep
    assert pc.total > 3e11


def test_meta_check_reports_a_mismatch() -> None:
    """The check compares, it does not just echo: a wrong analytic count is flagged."""
    router = RouterConfig(kind="topk", top_k=2)
    pc = count_params(SMALL, router)
    assert meta_check(SMALL, router, 2, pc)["match"]
    wrong = count_params(replace(SMALL, d_ff=32), router)
    assert not meta_check(SMALL, router, 2, wrong)["match"]
