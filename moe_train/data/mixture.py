"""How many sequences of every global batch each source of a mixture gives.

Source i's quota of a batch of B sequences is q_i = B w_i / sum(w). Largest-remainder rounding
(Hamilton's method): every source gets floor(q_i), and the L = B - sum floor(q_i) sequences left
go to the L largest remainders q_i - floor(q_i). So the counts are the same every step, and each
is floor(q_i) or ceil(q_i). Where remainders tie at the cut (equal weights that do not divide B),
the tied sources take the leftover seats in turn, starting at seed mod m, so over steps they get
exactly equal shares. Everything is a closed-form function of (seed, step): `cumulative(s)`, the
sequences each source gave in steps [0, s), is what the epoch sampler indexes with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .tokens import DataError


def check_weights(weights: Sequence[float], names: Sequence[str]) -> None:
    """Every weight positive and finite (DataError naming the source)."""
    for w, name in zip(weights, names):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise DataError(
                f"data.mix: source {name!r} has weight {w!r}; weights must be positive, finite "
                "numbers (they are normalised: 3 and 1 mean 75% and 25%)"
            )


class Mixture:
    """Per-step counts of `len(weights)` sources in a global batch of `global_batch`."""

    def __init__(self, weights: Sequence[float], global_batch: int, seed: int) -> None:
        if global_batch <= 0:
            raise ValueError(f"global_batch must be positive, got {global_batch}")
        if not weights:
            raise ValueError("a mixture needs at least one source")
        total = sum(Fraction(w) for w in weights)
        quotas = [Fraction(global_batch) * Fraction(w) / total for w in weights]
        floors = [math.floor(q) for q in quotas]
        rest = [q - f for q, f in zip(quotas, floors)]
        left = global_batch - sum(floors)
        self.k, self.global_batch = len(weights), global_batch
        self.quotas = [float(q) for q in quotas]
        self.base = np.array(floors, dtype=np.int64)  # rows every step, before the tie seats
        self.tied: list[int] = []  # sources sharing `seats` leftover rows in turn
        self.seats, self.offset = 0, 0
        if left:
            cut = sorted(rest, reverse=True)[left - 1]
            above = [i for i, r in enumerate(rest) if r > cut]
            self.base[above] += 1
            self.tied = [i for i, r in enumerate(rest) if r == cut]
            self.seats = left - len(above)
            if self.seats == len(self.tied):
                self.base[self.tied] += 1
                self.tied, self.seats = [], 0
            else:
                self.offset = seed % len(self.tied)

    def counts(self, step: int) -> np.ndarray:
        """[k] int64 sequences of each source in step `step`'s batch (they sum to B)."""
        return self.cumulative(step + 1) - self.cumulative(step)

    def cumulative(self, steps: int) -> np.ndarray:
        """[k] int64 sequences of each source in steps [0, steps)."""
        out = self.base * steps
        m, seats, off = len(self.tied), self.seats, self.offset
        for t, i in enumerate(self.tied):
            out[i] += _residues(off + steps * seats, t, m) - _residues(off, t, m)
        return out

    def describe(self, names: Sequence[str]) -> str:
        """`web 11/16 (quota 11.2), code 5/16 (quota 4.8)`."""
        per = self.counts(0)
        parts = []
        for i, name in enumerate(names):
            rows = f"{per[i]}" if i not in self.tied else f"{self.base[i]}-{self.base[i] + 1}"
            parts.append(f"{name} {rows}/{self.global_batch} (quota {self.quotas[i]:.3g})")
        return ", ".join(parts)


def _residues(n: int, t: int, m: int) -> int:
    """#{p in [0, n) : p mod m == t}."""
    return max(0, (n - t + m - 1) // m)
