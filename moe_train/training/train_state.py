"""TrainState: where the run stands; what a checkpoint keeps of the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """The loop's progress. `state_dict` goes into the checkpoint's extra (keys step, best_val,
    skipped; the engine adds its own, e.g. scaler); `last_loss` is not checkpointed."""

    step: int = 0  # optimizer steps done, applied or skipped
    best_val: float = math.inf  # lowest validation loss so far
    skipped: int = 0  # steps not applied (non-finite loss or gradients)
    last_loss: float = math.nan  # train loss at the last log (mean over ranks)
    skipped_in_a_row: int = 0  # consecutive skipped steps up to now (not checkpointed)

    def finish_step(self, applied: bool) -> None:
        self.step += 1
        self.skipped += not applied
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_val": self.best_val, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint's extra (other keys, e.g. the engine's, are ignored)."""
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.skipped = int(state["skipped"])

    def summary(self) -> dict[str, Any]:
        """The run summary `train` returns."""
        return {
            "steps": self.step,
            "final_loss": self.last_loss,
            "best_val_loss": self.best_val,
            "skipped_steps": self.skipped,
        }
