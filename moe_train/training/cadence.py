"""When a periodic action (log, eval, checkpoint) is due."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Due after every `every`-th step and after the last one (`last` = trainer.max_steps).
    Steps count completed updates: 1 is after the first. `enabled=False` is never due."""

    every: int
    last: int
    enabled: bool = True

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == self.last)
