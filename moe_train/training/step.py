"""One optimizer step: forward and backward over this rank's micro-batches, then the update."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fault_points
from ..data import TrainingData
from ..data.sampler import Tokens
from ..engines import Engine
from ..ops.hashing import mix_seed
from ..routing import RouteKey
from ..routing.balancing import BiasBalancer
from .batches import BatchPlan
from .optim import set_lr

NOISE_STREAM = 0x0153  # mix_seed stream of the router noise (the same on every rank)


def lm_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    amp: Callable[[], AbstractContextManager],
    route_key: RouteKey | None,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(cross-entropy [], aux []) for tokens x -> targets y, both [b, T]; route_key keys the
    router noise (None: none, in eval); positions [b, T]: inside each document (document mask)."""
    with amp():
        if positions is None:  # the fast default: plain causal attention
            logits, aux = model(x, route_key)  # [b, T, vocab]
        else:
            logits, aux = model(x, route_key, positions=positions)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux


@dataclass
class StepOutput:
    """What one step leaves for the logger. Tensors are this rank's, not yet reduced over ranks."""

    lr: float
    loss: Tensor  # [] mean LM loss over the micro-batches
    aux: dict[str, Tensor]  # name -> [] mean over the micro-batches of each aux loss term
    applied: bool  # False: non-finite loss or gradients, the update was skipped


def train_step(
    engine: Engine, tokens: TrainingData | Tokens, plan: BatchPlan, step: int, lr: float, rank: int
) -> StepOutput:
    """Step `step` (0-based) at learning rate `lr`: every micro-batch's forward and backward through
    the engine, then engine.step() and the routers' balancing-bias update (routing/balancing.py).
    Dropout is seeded by (seed, step, rank), router noise by
    (seed, step), so both are functions of the step and a resumed run repeats them."""
    set_lr(engine.optimizer, lr)
    torch.manual_seed(mix_seed(plan.seed, step, rank))
    noise_seed = mix_seed(plan.seed, step, NOISE_STREAM)
    loss_sum = torch.zeros((), device=plan.device)
    aux_sum: dict[str, Tensor] = {}
    balancer = BiasBalancer(engine.module)  # aux-loss-free balancing: its routers' bias updates
    for m, (x, y, token_offset, positions) in enumerate(plan.micro_batches(tokens, step)):
        route_key = RouteKey(noise_seed, token_offset)  # x's first token is global token_offset
        with engine.micro_batch(last=m == plan.grad_accum - 1):
            loss, aux = lm_loss(engine.model, x, y, engine.autocast, route_key, positions)
            fault_points.reached("forward", step)
            if fault_points.armed() and loss.requires_grad:  # a test's point inside backward
                loss.register_hook(_backward_point(step))
            engine.backward(loss + aux)
        if balancer:
            balancer.add()  # this micro-batch's chosen-expert counts (recompute re-sets the same)
        loss_sum += loss.detach() / plan.grad_accum
        for name, value in engine.module.last_aux.items():
            aux_sum[name] = aux_sum.get(name, 0.0) + value.detach() / plan.grad_accum
    applied = engine.step()
    balancer.step(applied)  # after the optimizer step: one all-reduce of the counts, the update
    return StepOutput(lr=lr, loss=loss_sum, aux=aux_sum, applied=applied)


def _backward_point(step: int) -> Callable[[Tensor], None]:
    """A gradient hook that reaches the `backward` fault point (it runs inside backward)."""

    def hook(grad: Tensor) -> None:
        fault_points.reached("backward", step)

    return hook
