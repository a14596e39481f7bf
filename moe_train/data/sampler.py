"""Batches as pure functions of (seed, step): no sampler state to save, any rank count.

Training: step `s`'s global batch of B windows of T + 1 tokens draws each source's share
(`Mixture`: largest-remainder counts, the same every step) and, per source,
- `windows` sampling: random starts from `default_rng([seed, s])` for source 0 (one source: the
  same batches as before mixtures existed) and `default_rng([seed, s, i])` for source i;
- `epoch` sampling: the source's next non-overlapping windows in its epoch's shuffled order
  (moe_train/data/epochs.py), counted from step 0 in closed form (`Mixture.cumulative`).
With several sources the B rows are then put in an order drawn from (seed, s). A rank takes the
contiguous slice `[sample_start, sample_start + sample_count)` of that global batch
(`rank_share`). So the global batch does not depend on the number of ranks, and a resumed run
sees exactly the batches it would have seen, at an epoch boundary as anywhere else.

Validation: fixed, non-overlapping windows from the split's start, grouped into batches; every
rank sees the same batches and may take its share of each, so summing per-window losses (and
counts) across ranks gives the single-process mean exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .documents import window_positions
from .epochs import epoch_windows
from .mixture import Mixture
from .streams import TokenStream
from .tokens import DataError, TokenFile

Tokens = TokenFile | np.ndarray | TokenStream
SAMPLINGS = ("windows", "epoch")
_ORDER_STREAM = 0x4D49  # default_rng stream of a mixture's row order


def _stream(tokens: Tokens) -> TokenStream:
    return TokenStream.of(tokens)


def _check_len(num_tokens: int, seq_len: int, name: str) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if num_tokens < seq_len + 1:
        raise DataError(
            f"token file {name} has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1} "
            "needed for one training window; use a shorter seq_len or more data"
        )


def rank_share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(sample_start, sample_count) of `rank` when `total` samples are split contiguously over
    `world_size` ranks; the first `total % world_size` ranks get one more."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (rank < extra)


def _random_starts(key: list[int], count: int, num_tokens: int, seq_len: int) -> np.ndarray:
    rng = np.random.default_rng(key)
    return rng.integers(0, num_tokens - seq_len, size=count, dtype=np.int64)


def sample_offsets(
    seed: int, step: int, global_batch: int, num_tokens: int, seq_len: int
) -> np.ndarray:
    """[global_batch] int64 window starts in [0, num_tokens - seq_len - 1], a pure function of
    all arguments (numpy Generator seeded with [seed, step]): one source's `windows` sampling."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    _check_len(num_tokens, seq_len, "<tokens>")
    return _random_starts([seed, step], global_batch, num_tokens, seq_len)


class BatchSampler:
    """The global batches of a mixture of training streams (one stream: weight 1)."""

    def __init__(
        self,
        streams: Sequence[TokenStream],
        weights: Sequence[float],
        seed: int,
        global_batch: int,
        seq_len: int,
        sampling: str = "windows",
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        for s in streams:
            _check_len(len(s), seq_len, s.name)
        self.streams, self.seed, self.seq_len = list(streams), seed, seq_len
        self.global_batch, self.sampling = global_batch, sampling
        self.mixture = Mixture(weights, global_batch, seed)
        self.n_windows = [(len(s) - 1) // seq_len for s in self.streams]  # epoch sampling
        self._last: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None  # every micro-batch

    def epoch_steps(self, source: int = 0) -> float:
        """Steps per epoch of a source (its windows over its sequences per step)."""
        per_step = self.mixture.base[source] + (self.mixture.seats / len(self.mixture.tied)
                                                 if source in self.mixture.tied else 0)  # fmt: skip
        return self.n_windows[source] / per_step if per_step else float("inf")

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [B], window start [B]) int64 of step `step`'s global batch."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        counts = self.mixture.counts(step)
        first = self.mixture.cumulative(step) if self.sampling == "epoch" else None
        sources, starts = [], []
        for i, n in enumerate(counts.tolist()):
            if not n:
                continue
            if self.sampling == "windows":
                key = [self.seed, step] if i == 0 else [self.seed, step, i]
                offs = _random_starts(key, n, len(self.streams[i]), self.seq_len)
            else:
                assert first is not None
                w = epoch_windows(self.seed, i, int(first[i]), n, self.n_windows[i])
                offs = w * self.seq_len
            sources.append(np.full(n, i, dtype=np.int64))
            starts.append(offs)
        src, off = np.concatenate(sources), np.concatenate(starts)
        if len(self.streams) > 1:
            order = np.random.default_rng([self.seed, step, _ORDER_STREAM]).permutation(len(src))
            src, off = src[order], off[order]
        src.flags.writeable = off.flags.writeable = False  # shared by the step's micro-batches
        self._last = (step, (src, off))
        return src, off

    def batch(
        self, step: int, sample_start: int = 0, sample_count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [sample_start, sample_start + sample_count) of step `step`'s global batch:
        x, y int64 [sample_count, T], y is x shifted left by one token."""
        count = self.global_batch - sample_start if sample_count is None else sample_count
        _check_slice(sample_start, count, self.global_batch)
        src, off = self.rows(step)
        sl = slice(sample_start, sample_start + count)
        return _windows(self.streams, src[sl], off[sl], self.seq_len)

    def document_starts(self, step: int, sample: int) -> np.ndarray:
        """Where documents start inside input window `sample` of step `step` (offsets in
        [0, T), the first always 0): what a document mask of that row is built from."""
        src, off = self.rows(step)
        return self.streams[int(src[sample])].document_starts(int(off[sample]), self.seq_len)

    def positions(
        self, step: int, sample_start: int = 0, sample_count: int | None = None
    ) -> torch.Tensor:
        """[sample_count, T] int64: each input token's position inside its document, restarting
        at 0 at every document start, of the same samples `batch` returns (data.document_mask's
        carrier: RoPE positions and the block-diagonal mask follow from it)."""
        count = self.global_batch - sample_start if sample_count is None else sample_count
        _check_slice(sample_start, count, self.global_batch)
        rows = range(sample_start, sample_start + count)
        return window_positions([self.document_starts(step, r) for r in rows], self.seq_len)


def _windows(
    streams: Sequence[TokenStream], src: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, offset) rows -> x, y: int64 [B, seq_len] (contiguous); y is x shifted by one."""
    buf = np.empty((len(offsets), seq_len + 1), dtype=np.int64)  # [B, seq_len + 1]
    for r, (i, o) in enumerate(zip(src.tolist(), offsets.tolist())):
        buf[r] = streams[i].read(o, seq_len + 1)
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _check_slice(sample_start: int, sample_count: int, total: int) -> None:
    if sample_start < 0 or sample_count < 0 or sample_start + sample_count > total:
        raise ValueError(
            f"samples [{sample_start}, {sample_start + sample_count}) are outside the "
            f"batch of {total}"
        )


def get_batch(
    tokens: Tokens,
    seed: int,
    step: int,
    global_batch: int,
    seq_len: int,
    sample_start: int = 0,
    sample_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [sample_start, sample_start + sample_count) of step `step`'s global batch of one
    source with `windows` sampling. Returns x, y: int64 [sample_count, seq_len]; y is x shifted
    left by one token. `sample_count=None` means the rest of the global batch."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    sampler = BatchSampler([_stream(tokens)], [1.0], seed, global_batch, seq_len)
    return sampler.batch(step, sample_start, sample_count)


def num_val_batches(
    tokens: Tokens, seq_len: int, batch_size: int, max_batches: int | None = None
) -> int:
    """How many full validation batches `val_batches` yields."""
    data = _stream(tokens)
    _check_len(len(data), seq_len, data.name)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = (len(data) - 1) // seq_len
    n = windows // batch_size
    if n == 0:
        raise DataError(
            f"token file {data.name} has {len(data)} tokens: {windows} validation windows of "
            f"seq_len {seq_len}, fewer than one batch of {batch_size}; use a smaller batch or "
            "seq_len, or more validation data (e.g. a larger --val-fraction in moe-train-prepare)"
        )
    return n if max_batches is None else min(n, max_batches)


def val_batches(
    tokens: Tokens,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    sample_start: int = 0,
    sample_count: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: window j of batch b starts at (b * batch_size + j) *
    seq_len; windows never overlap and only full batches are used. Yields x, y: int64
    [sample_count, seq_len], the slice [sample_start, sample_start + sample_count) of each batch
    (default: the whole batch). Same batches on every rank, whatever the rank count."""
    data = _stream(tokens)
    for offsets in _val_offsets(
        tokens, seq_len, batch_size, max_batches, sample_start, sample_count
    ):
        yield _windows([data], np.zeros(len(offsets), dtype=np.int64), offsets, seq_len)


def _val_offsets(
    tokens: Tokens, seq_len: int, batch_size: int, max_batches: int | None,
    sample_start: int, sample_count: int | None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """The first token of each window of each validation batch ([sample_count] int64 per batch),
    as val_batches and val_positions read them."""
    n = num_val_batches(tokens, seq_len, batch_size, max_batches)
    count = batch_size - sample_start if sample_count is None else sample_count
    _check_slice(sample_start, count, batch_size)
    for b in range(n):
        first = b * batch_size + sample_start
        yield np.arange(first, first + count, dtype=np.int64) * seq_len


def val_positions(
    tokens: Tokens,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    sample_start: int = 0,
    sample_count: int | None = None,
) -> Iterator[torch.Tensor]:
    """The document positions ([sample_count, seq_len] int64, restarting at 0 at each document
    start) of the windows `val_batches` yields with the same arguments, batch by batch."""
    data = _stream(tokens)
    for offsets in _val_offsets(
        tokens, seq_len, batch_size, max_batches, sample_start, sample_count
    ):
        starts = [data.document_starts(int(o), seq_len) for o in offsets]
        yield window_positions(starts, seq_len)
