"""FSDP x expert parallelism when a rank's experts receive no tokens while their dp peer's do: the
empty rank must reduce-scatter its expert gradients at the same point of backward as its peer
(a bank cut off from its input would do it at the end of backward instead, out of order with the
all-to-alls: a hang). 4 gloo ranks (ep=2 x dp=2) against 1 process, two optimizer steps.

Routing is forced by token id: ids below 32 go to expert 0, the others to expert 3. Ranks 0-1
(one ep group) read low ids, ranks 2-3 high ones, so rank 1 (experts 2-3) and rank 2 (experts 0-1)
receive nothing while their dp peers, ranks 3 and 0, receive every routed token."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

VOCAB, SEQ = 64, 16


def _batch(rank: int) -> torch.Tensor:
    """Rank `rank`'s 2 sequences of SEQ + 1 ids: low ids on ranks 0-1, high ones on ranks 2-3."""
    g = torch.Generator().manual_seed(rank)
    return torch.randint(0, VOCAB // 2, (2, SEQ + 1), generator=g) + (VOCAB // 2) * (rank // 2)


def _force_routing(model: torch.nn.Module) -> None:
    """Add a large logit to expert 0 for ids < VOCAB/2 and to expert 3 for the others."""
    from moe_train.routing.base import Router

    ids: list[torch.Tensor] = []  # the token ids of the current forward
    model.register_forward_pre_hook(lambda _m, args: ids.__setitem__(slice(None), [args[0]]))
    bias = torch.zeros(VOCAB, 4)
    bias[: VOCAB // 2, 0], bias[VOCAB // 2 :, 3] = 20.0, 20.0
    for router in (m for m in model.modules() if isinstance(m, Router)):
        plain = router.logits

        def logits(x32, *args, _plain=plain, **kwargs):
            return _plain(x32, *args, **kwargs) + bias[ids[0].flatten()]

        router.logits = logits


def _two_steps(rank: int, world: int) -> dict:
    from moe_train.config import TrainConfig
    from moe_train.model import ModelConfig
    from moe_train.parallel import init_parallel
    from moe_train.parallel.placement import expert_banks
    from moe_train.routing import RouteKey
    from moe_train.training.build import build_engine

    cfg = TrainConfig(
        model=ModelConfig(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=2,
                          d_ff=64, num_experts=4, moe_every=1),
    )  # fmt: skip
    cfg.router.kind, cfg.router.jitter_eps = "switch", 0.0
    if world > 1:
        cfg.parallel.ep, cfg.parallel.fsdp = 2, True
    cfg.parallel.timeout_s = 60.0  # a collective out of order fails within a minute
    state = init_parallel(cfg.parallel, 4, cfg.router)
    engine = build_engine(cfg, state, micro_batch=2 * 4 // world, grad_accum=1)
    _force_routing(engine.module)
    rows = [0]  # rows this rank's expert banks received
    for bank in expert_banks(engine.module):
        bank.register_forward_pre_hook(lambda _m, args: rows.__setitem__(0, rows[0] + len(args[0])))
    x = _batch(rank) if world > 1 else torch.cat([_batch(r) for r in range(4)])
    losses = []
    for step in range(3):
        with engine.micro_batch(last=True):
            logits, aux = engine.model(x[:, :-1], RouteKey(step))
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            engine.backward(ce + aux)
        losses.append(float(ce))
        if step < 2:
            engine.step()
    state.shutdown()
    return {"losses": losses, "rows": rows[0]}


def test_a_rank_whose_experts_get_no_tokens_keeps_the_collectives_in_step():
    single = run_ranks(_two_steps, 1, timeout=240)[0]["losses"]
    ranks = run_ranks(_two_steps, 4, timeout=300)
    assert [r["rows"] == 0 for r in ranks] == [False, True, True, False], [r["rows"] for r in ranks]
    mean = [sum(r["losses"][i] for r in ranks) / 4 for i in range(3)]
    assert single[2] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, mean)):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: 1 process {a}, 4 ranks {b}"
