"""Named points of the training loop where a test makes the process signal itself or stall.

`MOE_TRAIN_FAULT="POINT@STEP[:RANK][=ACTION][,...]"` arms them; unset (the normal case) every
`reached` call is one dictionary lookup. POINT is one of POINTS, STEP the 0-based step being
trained (for `save`/`async_save`: the step being saved), RANK the only rank that acts (default:
every rank), ACTION `TERM` / `INT` / `USR1` (send that signal to this process, the default TERM)
or `sleep:SECONDS` (stall there). Each armed point acts once per run (`reset` at the start). Deterministic: probes
name where a signal lands instead of timing it with sleeps.

    MOE_TRAIN_FAULT=backward@5:1        # rank 1 sends itself SIGTERM inside step 5's backward
    MOE_TRAIN_FAULT=forward@2:0=sleep:60
"""

from __future__ import annotations

import os
import signal
import time

ENV = "MOE_TRAIN_FAULT"
# forward, backward (inside autograd's backward), eval (between validation batches), save
# (tensors written, not yet published: a synchronous save), async_save (in the writer thread),
# step (the start of a step: with the first step after a resume, "the first step after resume")
POINTS = ("step", "forward", "backward", "eval", "save", "async_save")

_parsed: dict[str, list[tuple[str, int, int | None, str]]] = {}
_done: set[tuple[str, int, int | None, str]] = set()


def _faults() -> list[tuple[str, int, int | None, str]]:
    spec = os.environ.get(ENV, "")
    if spec not in _parsed:
        _parsed[spec] = [_parse(item) for item in spec.split(",") if item.strip()]
    return _parsed[spec]


def _parse(item: str) -> tuple[str, int, int | None, str]:
    where, _, action = item.strip().partition("=")
    point, _, at = where.partition("@")
    step, _, rank = at.partition(":")
    if point not in POINTS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(
            f"{ENV}={os.environ.get(ENV)!r}: {item!r} is not POINT@STEP[:RANK][=ACTION] with "
            f"POINT one of {', '.join(POINTS)}"
        )
    return point, int(step), int(rank) if rank else None, action or "TERM"


def armed() -> bool:
    """Is any fault point armed (so callers may skip setting up hooks)?"""
    return bool(os.environ.get(ENV))


def reached(point: str, step: int) -> None:
    """The loop is at `point` of step `step`: act if a fault is armed there."""
    if not os.environ.get(ENV):
        return
    rank = int(os.environ.get("RANK", "0"))
    for fault in _faults():
        p, s, r, action = fault
        if p != point or s != step or (r is not None and r != rank) or fault in _done:
            continue
        _done.add(fault)
        if action.startswith("sleep:"):
            time.sleep(float(action.removeprefix("sleep:")))
        else:
            os.kill(os.getpid(), signal.Signals[f"SIG{action}"])


def reset() -> None:
    """Arm every point again (the start of a run)."""
    _done.clear()
