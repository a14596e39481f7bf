"""Field checks shared by every config dataclass: each error names the key and the allowed values.

check_finite(cfg, "optim")                          # no NaN/inf in any float field
at_least(cfg, "model", 1, "vocab_size", "d_model")  # model.vocab_size: must be >= 1, got 0
in_range(cfg, "optim", 0, 1, "beta1", "beta2")      # [0, 1) by default
one_of(cfg, "trainer", "precision", PRECISIONS)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


def _value(cfg: Any, name: str) -> Any:
    return getattr(cfg, name)


def check_finite(cfg: Any, section: str) -> None:
    """Every float field of the dataclass `cfg` is finite: NaN and inf fail naming the key
    (NaN would otherwise pass every `<`/`>` check and switch features off silently)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{section}.{f.name}: must be a finite number, got {value}")


def at_least(cfg: Any, section: str, low: float, *names: str, optional: bool = False) -> None:
    """Each field is >= low (None allowed when optional, i.e. the field means 'off/auto')."""
    for name in names:
        value = _value(cfg, name)
        if value is None and optional:
            continue
        if value is None or not value >= low:
            extra = " or null" if optional else ""
            raise ValueError(f"{section}.{name}: must be >= {low}{extra}, got {value}")


def above(cfg: Any, section: str, low: float, *names: str, optional: bool = False) -> None:
    """Each field is > low (None allowed when optional)."""
    for name in names:
        value = _value(cfg, name)
        if value is None and optional:
            continue
        if value is None or not value > low:
            extra = " or null" if optional else ""
            raise ValueError(f"{section}.{name}: must be > {low}{extra}, got {value}")


def in_range(
    cfg: Any,
    section: str,
    low: float,
    high: float,
    *names: str,
    high_inclusive: bool = False,
    optional: bool = False,
) -> None:
    """Each field is in [low, high) ([low, high] with high_inclusive; None when optional)."""
    for name in names:
        value = _value(cfg, name)
        if value is None and optional:
            continue
        ok = (
            value is not None
            and low <= value
            and (value <= high if high_inclusive else value < high)
        )
        if not ok:
            closing = "]" if high_inclusive else ")"
            raise ValueError(f"{section}.{name}: must be in [{low}, {high}{closing}, got {value}")


def one_of(cfg: Any, section: str, name: str, choices: Iterable[Any]) -> None:
    """The field is one of `choices`."""
    allowed = tuple(choices)
    value = _value(cfg, name)
    if value not in allowed:
        raise ValueError(
            f"{section}.{name}: got {value!r}; allowed: {', '.join(str(c) for c in allowed)}"
        )
