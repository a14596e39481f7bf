"""TokenStream: one split of one source as a flat token sequence, whatever the files behind it.

A stream concatenates segments (a legacy `train.bin`, the shards of a manifest, the `.bin` files
of Megatron datasets), all memory-mapped, and may be restricted to a token range [lo, hi) of the
concatenation (a Megatron source's held-out tail is its validation split). Windows are read
across segment boundaries; `document_starts` says where documents begin inside a window, from
the document index when the segment has one, else from the end-of-document tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .tokens import TokenFile


class DocumentIndex(Protocol):
    def doc_starts_between(self, lo: int, hi: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Segment:
    """One memory-mapped token file of a stream. `index` gives its document starts (Megatron
    layout); without one, a document starts after every `eot_id` token (and at 0)."""

    tokens: np.ndarray  # [n] memmap
    name: str  # the file, for messages
    index: DocumentIndex | None = None
    eot_id: int | None = None

    @property
    def knows_documents(self) -> bool:
        """Whether its document starts are known (an index or an end-of-document token)."""
        return self.index is not None or self.eot_id is not None

    def doc_starts_between(self, lo: int, hi: int) -> np.ndarray:
        """[k] int64 positions p in [lo, hi) of this segment where a document starts."""
        if self.index is not None:
            return self.index.doc_starts_between(lo, hi)
        starts = [np.zeros(1, dtype=np.int64)] if lo == 0 < hi else []
        if self.eot_id is not None and hi > max(lo, 1):
            first = max(lo, 1)
            prev = np.asarray(self.tokens[first - 1 : hi - 1])  # the token before each position
            starts.append(first + np.flatnonzero(prev == self.eot_id).astype(np.int64))
        return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


class TokenStream:
    """Segments concatenated, seen through the range [lo, hi) (default: all of it).

    len(stream) tokens; read(start, n) -> [n] int64; document_starts(start, n) -> the window's
    document starts. `name` names the split in messages (e.g. `data/web (train)`).
    """

    def __init__(
        self, segments: Sequence[Segment], name: str, lo: int = 0, hi: int | None = None
    ) -> None:
        self.segments = [s for s in segments if len(s.tokens)]
        self.name = name
        sizes = np.array([len(s.tokens) for s in self.segments], dtype=np.int64)
        self.bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [n_seg + 1]
        total = int(self.bases[-1])
        self.lo, self.hi = lo, total if hi is None else hi
        if not 0 <= self.lo <= self.hi <= total:
            raise ValueError(f"range [{lo}, {hi}) outside the {total} tokens of {name}")

    @classmethod
    def of(cls, tokens: TokenFile | np.ndarray | TokenStream, eot_id: int | None = None):
        """A TokenFile or an array as a one-segment stream (a stream is returned as it is)."""
        if isinstance(tokens, TokenStream):
            return tokens
        if isinstance(tokens, TokenFile):
            return cls([Segment(tokens.tokens, str(tokens.path), eot_id=eot_id)], str(tokens.path))
        return cls([Segment(np.asarray(tokens), "<array>", eot_id=eot_id)], "<array>")

    def __len__(self) -> int:
        return self.hi - self.lo

    def __repr__(self) -> str:
        return f"TokenStream({self.name!r}, {len(self)} tokens, {len(self.segments)} segments)"

    @property
    def knows_documents(self) -> bool:
        """Whether every segment knows where its documents start (what document masks need)."""
        return all(s.knows_documents for s in self.segments)

    def sub(self, lo: int, hi: int) -> TokenStream:
        """The tokens [lo, hi) of this stream, as a stream."""
        if not 0 <= lo <= hi <= len(self):
            raise ValueError(f"range [{lo}, {hi}) outside the {len(self)} tokens of {self.name}")
        return TokenStream(self.segments, self.name, self.lo + lo, self.lo + hi)

    def _pieces(self, start: int, n: int):
        """(segment, local_lo, local_hi, stream position of local_lo) covering [start, start+n)."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(
                f"tokens [{start}, {start + n}) outside the {len(self)} of {self.name}"
            )
        a, b = self.lo + start, self.lo + start + n
        k = int(np.searchsorted(self.bases, a, "right")) - 1
        while a < b:
            base = int(self.bases[k])
            end = min(b, int(self.bases[k + 1]))
            yield self.segments[k], a - base, end - base, a - self.lo
            a, k = end, k + 1

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as [n] int64 (a window may span segments)."""
        out = np.empty(n, dtype=np.int64)
        for seg, lo, hi, pos in self._pieces(start, n):
            out[pos - start : pos - start + hi - lo] = seg.tokens[lo:hi]
        return out

    def document_starts(self, start: int, n: int) -> np.ndarray:
        """[k] int64 offsets in [0, n) where documents start inside the window [start, start+n),
        sorted; the first is always 0 (the window's first token begins its first piece, whether
        or not a document starts there). A segment boundary is a document boundary."""
        found = [np.zeros(1, dtype=np.int64)]
        for seg, lo, hi, pos in self._pieces(start, n):
            local = seg.doc_starts_between(lo, hi)
            found.append(local - lo + (pos - start))
            if lo == 0:  # every segment begins a document
                found.append(np.array([pos - start], dtype=np.int64))
        return np.unique(np.concatenate(found))
