"""Validation: the mean loss over fixed windows (per source of a mixture), and the Evaluator that
runs it on its cadence."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import fault_points
from ..data import TrainingData
from ..data.sampler import Tokens
from ..engines import Engine
from ..metrics import MetricsWriter
from .batches import BatchPlan
from .cadence import Every
from .step import lm_loss
from .train_state import TrainState


@torch.no_grad()
def evaluate(
    engine: Engine,
    tokens: Tokens,
    plan: BatchPlan,
    max_batches: int,
    mean_over_ranks: Callable[[Tensor], Tensor],
) -> float:
    """Mean validation loss over the same fixed windows whatever the layout (NaN with none).
    Collective when mean_over_ranks is: every rank calls it."""
    engine.model.eval()
    losses = [
        lm_loss(engine.model, x, y, engine.autocast, None, pos)[0]  # eval mode: no router noise
        for x, y, pos in plan.eval_batches(tokens, max_batches)
    ]
    engine.model.train()
    if not losses:
        return float("nan")
    return float(mean_over_ranks(torch.stack(losses).mean()))


def validation_losses(
    engine: Engine,
    data: TrainingData | Tokens,
    plan: BatchPlan,
    max_batches: int,
    mean_over_ranks: Callable[[Tensor], Tensor],
) -> dict[str, float]:
    """{"val_loss": ...}; for a mixture also "val_loss/<source>" per source with validation
    data, and val_loss is their mean weighted by the mixture's weights. Collective."""
    if not isinstance(data, TrainingData):
        return {"val_loss": evaluate(engine, data, plan, max_batches, mean_over_ranks)}
    parts = [
        (name, weight, evaluate(engine, val, plan, max_batches, mean_over_ranks))
        for name, weight, val in data.validation()
    ]
    if not parts:
        return {"val_loss": float("nan")}
    total = sum(w for _, w, _ in parts)
    out = {"val_loss": sum(w * loss for _, w, loss in parts) / total}
    if data.is_mixture:
        out.update({f"val_loss/{name}": loss for name, _, loss in parts})
    return out


class Evaluator:
    """Every eval_every steps and at the last (never with eval_batches=0): the validation loss to
    metrics.jsonl as val_loss (and val_loss/<source> for a mixture), the best one into the
    TrainState, and to `report(state, loss)` (e.g. TrainLogger.report_val: the progress bar and a
    console line) when given."""

    def __init__(
        self,
        tokens: TrainingData | Tokens,
        plan: BatchPlan,
        cadence: Every,
        *,
        max_batches: int,
        mean_over_ranks: Callable[[Tensor], Tensor],
        writer: MetricsWriter,
        report: Callable[[TrainState, float], None] | None = None,
    ):
        self.tokens, self.plan, self.cadence = tokens, plan, cadence
        self.max_batches, self.mean_over_ranks = max_batches, mean_over_ranks
        self.writer, self.report = writer, report

    def after_step(self, train_state: TrainState, engine: Engine) -> None:
        if not self.cadence.due(train_state.step):
            return
        fault_points.reached("eval", train_state.step)
        losses = validation_losses(
            engine, self.tokens, self.plan, self.max_batches, self.mean_over_ranks
        )
        val_loss = losses["val_loss"]
        train_state.best_val = min(train_state.best_val, val_loss)
        self.writer.log(train_state.step, losses)
        if self.report is not None:
            self.report(train_state, val_loss)
