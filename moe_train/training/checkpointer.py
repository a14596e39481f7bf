"""Checkpointer: saves through the engine on its cadence and resumes the run from run_dir."""

from __future__ import annotations

from pathlib import Path

from ..engines import Engine
from .cadence import Every
from .train_state import TrainState


class Checkpointer:
    """Every ckpt_every steps and at the last: model, optimizer and the extra
    {**TrainState.state_dict(), **engine.state_dict()} in the engine's own format."""

    def __init__(self, run_dir: Path, cadence: Every, *, keep: int):
        self.run_dir, self.cadence, self.keep = Path(run_dir), cadence, keep

    def restore(self, train_state: TrainState, engine: Engine) -> bool:
        """Load run_dir's newest checkpoint into the engine and train_state; False when none."""
        extra = engine.load_latest(self.run_dir)
        if extra is None:
            return False
        train_state.load_state_dict(extra)
        engine.load_state_dict(extra)
        return True

    def close(self, engine: Engine) -> None:
        """The last checkpoint is complete (and published) when this returns."""
        engine.finish_checkpoint()

    def after_step(self, train_state: TrainState, engine: Engine) -> None:
        if self.cadence.due(train_state.step):
            extra = {**train_state.state_dict(), **engine.state_dict()}
            engine.save_checkpoint(self.run_dir, train_state.step, extra, self.keep)
