"""The shared config field checks name the key and reject what they should."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from moe_train.validation import above, at_least, check_finite, in_range, one_of


@dataclass
class _Cfg:
    size: int = 4
    rate: float = 0.5
    cap: float | None = None
    kind: str = "a"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_key(bad):
    with pytest.raises(ValueError, match=r"sec\.rate: must be a finite number"):
        check_finite(_Cfg(rate=bad), "sec")
    check_finite(_Cfg(), "sec")


def test_at_least_and_above():
    at_least(_Cfg(size=1), "sec", 1, "size")
    with pytest.raises(ValueError, match=r"sec\.size: must be >= 1, got 0"):
        at_least(_Cfg(size=0), "sec", 1, "size")
    at_least(_Cfg(cap=None), "sec", 0, "cap", optional=True)
    with pytest.raises(ValueError, match=r"sec\.cap: must be >= 0, got None"):
        at_least(_Cfg(cap=None), "sec", 0, "cap")
    with pytest.raises(ValueError, match=r"sec\.rate: must be > 0"):
        above(_Cfg(rate=0.0), "sec", 0, "rate")
    with pytest.raises(ValueError, match=r"sec\.rate"):  # NaN fails every bound
        above(_Cfg(rate=float("nan")), "sec", 0, "rate")


def test_in_range_half_open_and_closed():
    in_range(_Cfg(rate=0.0), "sec", 0, 1, "rate")
    with pytest.raises(ValueError, match=r"sec\.rate: must be in \[0, 1\), got 1"):
        in_range(_Cfg(rate=1.0), "sec", 0, 1, "rate")
    in_range(_Cfg(rate=1.0), "sec", 0, 1, "rate", high_inclusive=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        in_range(_Cfg(rate=1.5), "sec", 0, 1, "rate", high_inclusive=True)


def test_one_of():
    one_of(_Cfg(kind="b"), "sec", "kind", ("a", "b"))
    with pytest.raises(ValueError, match=r"sec\.kind: got 'c'; allowed: a, b"):
        one_of(_Cfg(kind="c"), "sec", "kind", ("a", "b"))
