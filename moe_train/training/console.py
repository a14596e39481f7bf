"""What a rank other than 0 prints: only warnings and errors (stderr), each line prefixed with its
rank, so N ranks' output in one Slurm file reads as rank 0's log plus labelled exceptions."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class RankPrefixed:
    """A text stream that writes `[rank R] ` before every line it passes on."""

    def __init__(self, stream: TextIO, rank: int):
        self.stream, self.prefix = stream, f"[rank {rank}] "
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start and not piece.startswith(self.prefix):
                out.append(self.prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str):  # encoding, errors, ...: the wrapped stream's
        return getattr(self.stream, name)


@contextmanager
def rank_console(rank: int) -> Iterator[None]:
    """On ranks > 0, every line on stderr (warnings, errors, the traceback of an exception that
    ends the run) carries the rank; rank 0 is left as it is. The trainer prints on stdout from
    rank 0 only."""
    if rank == 0:
        yield
        return
    previous = sys.stderr
    sys.stderr = RankPrefixed(previous, rank)
    yield
    # restored on a normal return only: an exception's traceback, printed by the interpreter (or
    # torchrun) as the process ends, keeps the prefix
    sys.stderr.flush()
    sys.stderr = previous
