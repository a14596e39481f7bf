"""Collective calls that fail with a message naming the collective instead of hanging."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, never arrived within the timeout, or sizes disagreed."""


def guarded(name: str, fn: Callable[[], T], group_desc: str = "") -> T:
    """Run one collective call; on failure raise CollectiveError naming `name`.

    The process-group timeout (parallel.timeout_s) bounds the wait; gloo and NCCL raise after it.
    """
    try:
        return fn()
    except CollectiveError:
        raise
    except (RuntimeError, ValueError) as e:  # DistBackendError/DistError subclass RuntimeError
        where = f" over {group_desc}" if group_desc else ""
        raise CollectiveError(
            f"collective {name}{where} failed: {type(e).__name__}: {str(e).strip()[:400]}. "
            "A peer rank probably died or did not reach the same collective within "
            "parallel.timeout_s; check the other ranks' logs."
        ) from e
