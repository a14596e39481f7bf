"""Stop a run that has stopped learning: too many optimizer steps in a row were skipped."""

from __future__ import annotations

from .train_state import TrainState


class TrainingDiverged(RuntimeError):
    """trainer.max_skipped_steps consecutive steps had a non-finite loss or gradients."""


def check_skipped_steps(train_state: TrainState, limit: int | None, lr: float) -> None:
    """Raise TrainingDiverged once `limit` consecutive steps were skipped (None: never). Every
    rank sees the same skips (the gradient norm is global), so every rank stops at the same step."""
    run = train_state.skipped_in_a_row
    if limit is None or run < limit:
        return
    first = train_state.step - run + 1
    raise TrainingDiverged(
        f"training diverged: the last {run} steps ({first} to {train_state.step}) were all "
        f"skipped (non-finite loss or gradients; {train_state.skipped} skipped in all) and "
        f"trainer.max_skipped_steps={limit}. The weights are those of step {first - 1}; the "
        f"checkpoints are from before. Lower optim.lr (the last step's lr was {lr:.3g}), raise "
        "optim.warmup_steps, check the data, or raise trainer.max_skipped_steps (null: never stop)"
    )
