"""fp16 loss scaling makes one decision for the world: an overflow injected into one rank's expert
gradient makes every rank skip the step, halve the same loss scale, and keep identical dense
weights (4 gloo ranks, ep=2 x dp=2, with and without FSDP)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed


def _overflow_on_rank1(rank: int, world: int, fsdp: bool) -> dict:
    from moe_train.config import TrainConfig
    from moe_train.model import ModelConfig
    from moe_train.parallel import init_parallel, is_expert_param
    from moe_train.routing import RouteKey
    from moe_train.training.build import build_engine

    cfg = TrainConfig(
        model=ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                          num_experts=4, moe_every=1),
    )  # fmt: skip
    cfg.parallel.ep, cfg.parallel.fsdp, cfg.trainer.precision = 2, fsdp, "fp16"
    state = init_parallel(cfg.parallel, 4, cfg.router)
    engine = build_engine(cfg, state, micro_batch=2, grad_accum=1)

    def dense() -> list[torch.Tensor]:  # whole dense parameters (gathered when sharded)
        out = []
        for p in engine.module.parameters():
            if not is_expert_param(p):
                out.append((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone())
        return out

    before, scale = dense(), engine.scaler.get_scale()
    expert = next(p for p in engine.module.parameters() if is_expert_param(p))
    if rank == 1 and not fsdp:  # replicated: expert grads are reduced during backward (hooks),
        # so the overflow must come out of backward itself, as a real one does

        def poison(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        expert.register_hook(poison)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    with engine.micro_batch(last=True):
        with engine.autocast():
            logits, aux = engine.model(x[:, :-1], RouteKey(0))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        engine.backward(loss + aux)
    if rank == 1 and fsdp:  # one overflowing element in one expert of one rank
        grad = expert.grad.to_local() if hasattr(expert.grad, "to_local") else expert.grad
        grad.view(-1)[0] = float("inf")
    applied = engine.step()
    after = dense()
    out = {
        "applied": applied,
        "scale_before": scale,
        "scale": engine.scaler.get_scale(),
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
        "dense": [t.tolist() for t in after],
    }
    state.shutdown()
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_an_overflow_on_one_rank_is_skipped_by_every_rank_with_one_scale(fsdp):
    out = run_ranks(_overflow_on_rank1, 4, fsdp, timeout=240)
    assert [r["applied"] for r in out] == [False] * 4
    assert all(r["scale"] == out[0]["scale_before"] / 2 for r in out), [r["scale"] for r in out]
    assert all(r["unchanged"] for r in out)
    assert all(r["dense"] == out[0]["dense"] for r in out)
