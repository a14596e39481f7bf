"""Checkpointer: saves through the engine on its cadence and resumes the run from run_dir."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from ..engines import Engine
from .cadence import Every
from .stop import SAVE_SAFETY, SIGNAL_LEAD_ENV, TIME_MARGIN_S, write_save_seconds
from .train_state import TrainState


class Checkpointer:
    """Every ckpt_every steps and at the last: model, optimizer and the extra
    {**TrainState.state_dict(), **engine.state_dict()} in the engine's own format.

    The first save of a run is waited for even when async (engine's choice), to measure what a
    save costs at this size (`save_seconds`: the slowest save waited for; rank 0 writes it to
    the run folder and says what grace a stop needs); `save_now` saves the current step (unless
    it was just saved) and waits for it: the save of a stop."""

    def __init__(self, run_dir: Path, cadence: Every, *, keep: int, main: bool = False):
        self.run_dir, self.cadence, self.keep, self.main = Path(run_dir), cadence, keep, main
        self.saved_step: int | None = None  # the step of the newest save started
        self.save_seconds: float | None = None

    def restore(self, train_state: TrainState, engine: Engine) -> bool:
        """Load run_dir's newest checkpoint into the engine and train_state; False when none."""
        extra = engine.load_latest(self.run_dir)
        if extra is None:
            return False
        train_state.load_state_dict(extra)
        engine.load_state_dict(extra)
        self.saved_step = train_state.step
        return True

    def close(self, engine: Engine) -> None:
        """The last checkpoint is complete (and published) when this returns."""
        engine.finish_checkpoint()

    def after_step(self, train_state: TrainState, engine: Engine) -> None:
        if self.cadence.due(train_state.step):
            self._save(train_state, engine, wait=self.save_seconds is None)

    def save_now(self, train_state: TrainState, engine: Engine) -> None:
        """A complete, published checkpoint of this step when this returns (collective)."""
        if self.saved_step == train_state.step:
            engine.finish_checkpoint()  # saved on the cadence at this step: finish that one
        else:
            self._save(train_state, engine, wait=True)

    def _save(self, train_state: TrainState, engine: Engine, wait: bool) -> None:
        engine.finish_checkpoint()  # an earlier save in flight is not part of this one's time
        started = time.perf_counter()
        extra = {**train_state.state_dict(), **engine.state_dict()}
        engine.save_checkpoint(self.run_dir, train_state.step, extra, self.keep)
        self.saved_step = train_state.step
        if not wait:
            return
        engine.finish_checkpoint()
        seconds = time.perf_counter() - started
        first = self.save_seconds is None
        self.save_seconds = max(self.save_seconds or 0.0, seconds)
        if self.main:
            write_save_seconds(self.run_dir, self.save_seconds)
            if first:
                self._say_grace(train_state.step, seconds)

    def _say_grace(self, step: int, seconds: float) -> None:
        """Rank 0, after the first save: the grace a stop needs; a warning when the batch
        system's lead (SIGNAL_LEAD_ENV, set by launch/slurm/train.sbatch) is shorter."""
        grace = _grace(seconds)
        print(
            f"checkpoint step {step} saved in {seconds:.1f} s: a stop (a signal, "
            "trainer.time_limit) needs one step and this save after its signal; give the batch "
            f"system's warning (Slurm: --signal=B:USR1@SECONDS) at least {grace:.0f} s",
            flush=True,
        )
        lead = os.environ.get(SIGNAL_LEAD_ENV)
        if lead and lead.isdigit() and int(lead) < grace:
            warnings.warn(
                f"the stop signal comes {lead} s before the time limit ({SIGNAL_LEAD_ENV}), less "
                f"than the {grace:.0f} s a save needs: the checkpoint of a time-limit stop may "
                "not finish; raise --signal=B:USR1@SECONDS and SIGNAL_LEAD_S",
                stacklevel=2,
            )


def _grace(save_s: float) -> float:
    """The lead a stop signal needs, from one measured save (the step is small beside it on
    clusters; the time limit's own rule adds the measured step)."""
    return SAVE_SAFETY * save_s + TIME_MARGIN_S
