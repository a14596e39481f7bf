"""Small picklable values over the world, so that every rank takes the same decision: rank 0's
verdict on the run folder, the files a rank hashed, the checkpoint a run falls back to.

With no process group (one process, or `state` None) they are plain function calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist

from .errors import guarded

if TYPE_CHECKING:
    from .runtime import ParallelState

T = TypeVar("T")


def is_distributed(state: ParallelState | None) -> bool:
    """Is there a process group (more than a plain function call to make)?"""
    return state is not None and state.dims.distributed


def barrier(state: ParallelState | None) -> None:
    """Wait for every rank; nothing with no process group."""
    if is_distributed(state):
        state.barrier()  # type: ignore[union-attr]


def from_main(state: ParallelState | None, fn: Callable[[], T]) -> T:
    """`fn()` computed on rank 0 and broadcast: every rank returns rank 0's value. An exception
    in `fn` on rank 0 is re-raised on every rank (as the same type when it pickles)."""
    if not is_distributed(state):
        return fn()
    box: list[Any] = [None]
    if state.dims.is_main:  # type: ignore[union-attr]
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - shipped to every rank, raised there
            box[0] = ("error", e)
    guarded("broadcast_object_list", lambda: dist.broadcast_object_list(box, src=0))
    status, value = box[0]
    if status == "error":
        raise value
    return value


def gather_all(state: ParallelState | None, value: T) -> list[T]:
    """Every rank's `value`, by rank, on every rank."""
    if not is_distributed(state):
        return [value]
    out: list[Any] = [None] * state.dims.world_size  # type: ignore[union-attr]
    guarded("all_gather_object", lambda: dist.all_gather_object(out, value))
    return out
