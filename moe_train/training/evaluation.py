"""Validation: the mean loss over fixed windows, and the Evaluator that runs it on its cadence."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..data import TokenFile
from ..engines import Engine
from ..metrics import MetricsWriter
from .batches import BatchPlan
from .cadence import Every
from .step import lm_loss
from .train_state import TrainState


@torch.no_grad()
def evaluate(
    engine: Engine,
    tokens: TokenFile,
    plan: BatchPlan,
    max_batches: int,
    mean_over_ranks: Callable[[Tensor], Tensor],
) -> float:
    """Mean validation loss over the same fixed windows whatever the layout (NaN with none).
    Collective when mean_over_ranks is: every rank calls it."""
    engine.model.eval()
    losses = [
        lm_loss(engine.model, x, y, engine.autocast, None)[0]  # eval mode: no router noise
        for x, y in plan.eval_batches(tokens, max_batches)
    ]
    engine.model.train()
    if not losses:
        return float("nan")
    return float(mean_over_ranks(torch.stack(losses).mean()))


class Evaluator:
    """Every eval_every steps and at the last (never with eval_batches=0): the validation loss to
    metrics.jsonl as val_loss, the best one into the TrainState, and to `report(state, loss)`
    (e.g. TrainLogger.report_val: the progress bar and a console line) when given."""

    def __init__(
        self,
        tokens: TokenFile,
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
        val_loss = evaluate(engine, self.tokens, self.plan, self.max_batches, self.mean_over_ranks)
        train_state.best_val = min(train_state.best_val, val_loss)
        self.writer.log(train_state.step, {"val_loss": val_loss})
        if self.report is not None:
            self.report(train_state, val_loss)
