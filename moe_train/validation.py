"""Field checks shared by every config dataclass: each error names the key and the allowed values.

check_finite(cfg, "optim")                          # no NaN/inf in any float field
at_least(cfg, "model", 1, "vocab_size", "d_model")  # model.vocab_size: must be >= 1, got 0
in_range(cfg, "optim", 0, 1, "beta1", "beta2")      # [0, 1) by default
one_of(cfg, "trainer", "precision", PRECISIONS)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
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


def _check(
    cfg: Any,
    section: str,
    names: tuple[str, ...],
    ok: Callable[[Any], bool],
    what: str,
    optional: bool,
) -> None:
    for name in names:
        value = _value(cfg, name)
        if value is None and optional:
            continue
        if value is None or not ok(value):
            extra = " or null" if optional else ""
            raise ValueError(f"{section}.{name}: must be {what}{extra}, got {value}")


def at_least(cfg: Any, section: str, low: float, *names: str, optional: bool = False) -> None:
    """Each field is >= low (None allowed when optional, i.e. the field means 'off/auto')."""
    _check(cfg, section, names, lambda v: v >= low, f">= {low}", optional)


def above(cfg: Any, section: str, low: float, *names: str, optional: bool = False) -> None:
    """Each field is > low (None allowed when optional)."""
    _check(cfg, section, names, lambda v: v > low, f"> {low}", optional)


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
    closing = "]" if high_inclusive else ")"
    _check(
        cfg,
        section,
        names,
        lambda v: low <= v and (v <= high if high_inclusive else v < high),
        f"in [{low}, {high}{closing}",
        optional,
    )


def one_of(cfg: Any, section: str, name: str, choices: Iterable[Any]) -> None:
    """The field is one of `choices`."""
    allowed = tuple(choices)
    value = _value(cfg, name)
    if value not in allowed:
        raise ValueError(
            f"{section}.{name}: got {value!r}; allowed: {', '.join(str(c) for c in allowed)}"
        )
