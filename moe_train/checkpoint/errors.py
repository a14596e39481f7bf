"""What goes wrong with a checkpoint, and how a failure is told in one line (save and load)."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged (checksum, size, missing file, unreadable): an earlier
    checkpoint may still load. A checkpoint that does not fit the model is not corrupt."""


def short_cause(e: BaseException) -> BaseException | None:
    """The cause to chain: not torch's CheckpointException, whose text is every rank's traceback
    (its per-rank summary is in our message)."""
    return None if isinstance(e, CheckpointException) else e


def describe(e: BaseException) -> str:
    """One line per underlying failure (torch's CheckpointException holds one per rank)."""
    if isinstance(e, CheckpointException):
        parts = []
        for rank, failure in sorted(e.failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {one_line(exc)}")
        return "; ".join(parts) or "CheckpointException"
    return one_line(e)


def one_line(e: BaseException) -> str:
    """The failure's type and first line (300 characters at most)."""
    text = str(e).strip().splitlines()
    hint = " (a file ends early: truncated?)" if isinstance(e, EOFError) else ""
    return f"{type(e).__name__}: {text[0][:300] if text else ''}{hint}"
