"""Aux-loss-free balancing: the bias rule against torchtitan's on a fixed load sequence, the
bias in the choice only, the train step's count over every micro-batch, and the checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from moe_train.data import TokenFile, write_tokens
from moe_train.routing import RouterConfig, build_router
from moe_train.routing.balancing import bias_update, biased_routers
from moe_train.training.step import train_step
from tests.helpers.training import engine_and_plan, small_cfg

RATE = 1e-3


def titan_update(bias: torch.Tensor, tokens_per_expert: torch.Tensor, coeff: float):
    """torchtitan 0.3.0 components/optimizer/optimizer.py `_update_expert_bias`, per layer:
    delta = coeff * sign(mean - load); delta -= mean(delta); bias += delta."""
    load = tokens_per_expert.float()
    delta = coeff * torch.sign(load.mean() - load)
    return bias + (delta - delta.mean())


def test_bias_rule_matches_torchtitan_step_by_step_up_to_a_shift_that_changes_no_choice():
    gen = torch.Generator().manual_seed(0)
    loads = torch.randint(0, 50, (30, 8), generator=gen)  # a fixed load sequence
    loads[3] = 7  # a step with equal loads: no move
    ours, titan = torch.zeros(8), torch.zeros(8)
    scores = torch.rand(64, 8, generator=gen)
    for step, load in enumerate(loads):
        ours, titan = bias_update(ours, load, RATE), titan_update(titan, load, RATE)
        # torchtitan re-centres each update; the rules differ by a constant per step only
        torch.testing.assert_close(ours - ours.mean(), titan, atol=1e-7, rtol=0)
        assert torch.equal((scores + ours).argsort(1), (scores + titan).argsort(1)), step
    assert torch.equal(bias_update(torch.zeros(8), loads[3], RATE), torch.zeros(8))


def test_bias_chooses_but_never_weighs():
    cfg = RouterConfig(kind="topk", score="sigmoid", bias_update_rate=RATE, capacity_factor=None)
    router = build_router(cfg, 16, 8)
    x = torch.randn(32, 16)
    before = router(x)
    with torch.no_grad():
        router.score_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    after = router(x)
    assert set(after.expert.tolist()) == {0, 1}  # the bias decides
    probs = torch.sigmoid(router.logits(x))
    w = probs[after.token, after.expert] / probs[:, :2].sum(1)[after.token]
    torch.testing.assert_close(after.weight, w)  # the weights: unbiased scores, renormalised
    assert not torch.equal(before.expert, after.expert)


def test_train_step_counts_every_micro_batch_and_the_bias_is_checkpointed(tmp_path):
    rng = np.random.default_rng(0)
    tokens = TokenFile(write_tokens(tmp_path / "t.bin", rng.integers(0, 256, 4000), 256, "byte"))
    cfg = small_cfg()
    cfg.router = RouterConfig(kind="topk", score="sigmoid", bias_update_rate=RATE)
    engine, plan = engine_and_plan(cfg, micro=2, accum=2)
    (router,) = biased_routers(engine.module)
    seen = []
    hook = router.register_forward_hook(lambda m, i, o: seen.append(m.last_choice_load.clone()))
    train_step(engine, tokens, plan, 0, 1e-3, rank=0)
    hook.remove()
    assert len(seen) == 2  # both micro-batches
    want = bias_update(torch.zeros(4), seen[0] + seen[1], RATE)
    torch.testing.assert_close(router.score_bias, want)
    assert (router.score_bias != 0).any()
    state = engine.module.state_dict()
    assert any(k.endswith("router.score_bias") for k in state)
    stats = engine.module.moe_layers()[0].last_stats
    assert stats["bias_max"] == float(want.max()) and stats["bias_min"] == float(want.min())
