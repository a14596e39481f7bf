"""Stop rules: a signal (trainer.stop_signals) or the wall-clock limit (trainer.time_limit) ends
the run at a step boundary with a checkpoint of that step, every rank agreeing, and the process
exits with EXIT_RESUME ("stopped to be resumed": run the same command again).

- The handlers only set a flag (and say so on stderr), so a signal never interrupts a save; a
  second signal is acknowledged and changes nothing. Only a third SIGINT (an impatient Ctrl-C)
  ends the process at once, without the save: the batch system's own SIGKILL after its grace
  period is the hard stop for SIGTERM and SIGUSR1.
- Agreement: at every step boundary each rank contributes (signal seen, time is up) and one
  all-reduce MAX of those two numbers decides for all, so a signal that reached one rank only (a
  node's agent) stops every rank at the same step.
- Time limit: continue only while the time left covers the slowest step seen and the save after
  it (SAVE_SAFETY x the slowest save measured; before the first save, the one recorded in the run
  folder by an earlier run, else none) plus TIME_MARGIN_S.
- Files in the run folder (rank 0): `stopped` (`step=N reason=R`, written once the checkpoint
  is published, removed when a run starts: the Slurm script requeues only when it is there) and
  `save_seconds` (the slowest save of the last run, read by the time limit and the Slurm script).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..parallel import ParallelState

# sysexits.h EX_TEMPFAIL ("temporary failure, the user is invited to retry"): not a signal's
# 128+n, not Python's 1 (an error) or 2 (bad usage), not torchrun's or Slurm's own codes
EXIT_RESUME = 75
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")
STOPPED_FILE = "stopped"
SAVE_SECONDS_FILE = "save_seconds"
# seconds between the batch system's stop signal and its hard kill (launch/slurm/train.sbatch
# sets it from SIGNAL_LEAD_S): the first save's measured time is checked against it
SIGNAL_LEAD_ENV = "MOE_TRAIN_SIGNAL_LEAD_S"
SAVE_SAFETY = 1.5  # the save after the last step is budgeted at 1.5 x the slowest one measured
TIME_MARGIN_S = 5.0  # and this much more: exiting, flushing logs
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str | float | int, field: str = "trainer.time_limit") -> float:
    """Seconds in "3h50m", "90m", "1d2h", "45s", "3600" (plain seconds) or a number."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or "".join(a + u for a, u in parts) != s:
                raise ValueError(
                    f"{field}={text!r} is not a duration: write seconds (3600) or units d, h, m, "
                    "s (3h50m, 90m, 45s)"
                ) from None
            seconds = sum(float(a) * _UNITS[u] for a, u in parts)
    if not seconds > 0:
        raise ValueError(f"{field}={text!r} must be a positive duration (null = no limit)")
    return seconds


def signal_numbers(names: Sequence[str], field: str = "trainer.stop_signals") -> list[int]:
    """The signal numbers of names like SIGTERM or TERM (checked against STOP_SIGNALS)."""
    out = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full not in STOP_SIGNALS or not hasattr(signal, full):
            raise ValueError(
                f"{field}: {name!r} is not a signal a run can stop on; use some of "
                f"{', '.join(STOP_SIGNALS)} (or [] for none)"
            )
        out.append(int(getattr(signal, full)))
    return out


class StopSignals:
    """Handlers for the stop signals that only set a flag (installed in the main thread only;
    `restore` puts the previous handlers back)."""

    def __init__(self, numbers: Sequence[int], rank: int = 0):
        self.numbers, self.rank = list(numbers), rank
        self.received: str | None = None  # the first stop signal's name
        self.interrupts = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; nothing to catch here
        for n in self.numbers:
            self._previous[n] = signal.signal(n, self._handle)

    def restore(self) -> None:
        for n, handler in self._previous.items():
            signal.signal(n, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.interrupts += signum == signal.SIGINT
        if signum == signal.SIGINT and self.interrupts >= 3:
            _say(self.rank, "third SIGINT: exiting now, without the checkpoint in progress")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = name
            _say(self.rank, f"{name}: stopping after this step with a checkpoint of it")
        else:
            _say(self.rank, f"{name}: already stopping ({self.received}); the save goes on")


def _say(rank: int, text: str) -> None:
    """A line on stderr from a signal handler (os.write: print is not reentrant)."""
    os.write(2, f"[rank {rank}] moe-train: {text}\n".encode())


class StopRule:
    """At each step boundary (`check`, collective): the reason every rank stops now, or None.
    Times the steps (`step_done`) and the saves (`save_done`) that the time limit budgets."""

    def __init__(
        self,
        signals: StopSignals,
        parallel: ParallelState,
        *,
        time_limit_s: float | None,
        started: float,
        save_s: float | None = None,
    ):
        self.signals, self.parallel = signals, parallel
        self.time_limit_s, self.started = time_limit_s, started
        self.slowest_step = 0.0
        self.slowest_save = save_s  # before this run's first save: the run folder's record
        self._step_start = time.perf_counter()

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def step_done(self) -> None:
        self.slowest_step = max(self.slowest_step, time.perf_counter() - self._step_start)

    def save_done(self, seconds: float) -> None:
        """The slowest save so far (the Checkpointer measures the ones it waits for)."""
        self.slowest_save = max(self.slowest_save or 0.0, seconds)

    def time_needed(self) -> float:
        """Seconds one more step and the final save need (the rule of the time limit)."""
        return self.slowest_step + SAVE_SAFETY * (self.slowest_save or 0.0) + TIME_MARGIN_S

    def time_is_up(self) -> bool:
        if self.time_limit_s is None:
            return False
        left = self.time_limit_s - (time.perf_counter() - self.started)
        return left < self.time_needed()

    def check(self) -> str | None:
        """Collective: every rank calls it at every step boundary and gets the same answer."""
        flags = torch.tensor(
            [self.signals.received is not None, self.time_is_up()],
            dtype=torch.int32,
            device=self.parallel.device,
        )
        flags = self.parallel.all_reduce_max(flags)
        signalled, timed_out = (bool(v) for v in flags.tolist())
        if signalled:
            return self.signals.received or "a signal on another rank"
        if timed_out:
            return "trainer.time_limit"
        return None


def read_save_seconds(run_dir: Path) -> float | None:
    try:
        return float((run_dir / SAVE_SECONDS_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_save_seconds(run_dir: Path, seconds: float) -> None:
    _write(run_dir / SAVE_SECONDS_FILE, f"{seconds:.2f}\n")


def write_stopped(run_dir: Path, step: int, reason: str) -> None:
    _write(run_dir / STOPPED_FILE, f"step={step} reason={reason.replace(' ', '_')}\n")


def clear_stopped(run_dir: Path) -> None:
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
