"""Batches as pure functions of (seed, step): no sampler state to save, any rank count.

Training: step `s` draws `global_batch` random window starts from `default_rng([seed, s])`; a rank
takes the contiguous slice `[sample_start, sample_start + sample_count)` of that global batch
(`rank_share`). So the global batch does not depend on the number of ranks, and a resumed run sees
exactly the batches it would have seen.

Validation: fixed, non-overlapping windows from the file's start, grouped into batches; every rank
sees the same batches and may take its share of each, so summing per-window losses (and counts)
across ranks gives the single-process mean exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .tokens import DataError, TokenFile

Tokens = TokenFile | np.ndarray


def _array(tokens: Tokens) -> tuple[np.ndarray, str]:
    if isinstance(tokens, TokenFile):
        return tokens.tokens, str(tokens.path)
    return np.asarray(tokens), "<array>"


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


def sample_offsets(
    seed: int, step: int, global_batch: int, num_tokens: int, seq_len: int
) -> np.ndarray:
    """[global_batch] int64 window starts in [0, num_tokens - seq_len - 1], a pure function of
    all arguments (numpy Generator seeded with [seed, step])."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    _check_len(num_tokens, seq_len, "<tokens>")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=global_batch, dtype=np.int64)


def _windows(
    data: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets [B] -> x, y: int64 [B, seq_len] (contiguous); y is x shifted left by one."""
    buf = np.empty((len(offsets), seq_len + 1), dtype=np.int64)  # [B, seq_len + 1]
    for i, o in enumerate(offsets):
        buf[i] = data[o : o + seq_len + 1]
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
    """Samples [sample_start, sample_start + sample_count) of step `step`'s global batch.

    Returns x, y: int64 [sample_count, seq_len]; y is x shifted left by one token.
    `sample_count=None` means the rest of the global batch.
    """
    data, name = _array(tokens)
    _check_len(len(data), seq_len, name)
    count = global_batch - sample_start if sample_count is None else sample_count
    _check_slice(sample_start, count, global_batch)
    offsets = sample_offsets(seed, step, global_batch, len(data), seq_len)
    x, y = _windows(data, offsets[sample_start : sample_start + count], seq_len)
    return x, y


def num_val_batches(
    tokens: Tokens, seq_len: int, batch_size: int, max_batches: int | None = None
) -> int:
    """How many full validation batches `val_batches` yields."""
    data, name = _array(tokens)
    _check_len(len(data), seq_len, name)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = (len(data) - 1) // seq_len
    n = windows // batch_size
    if n == 0:
        raise DataError(
            f"token file {name} has {len(data)} tokens: {windows} validation windows of "
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
    n = num_val_batches(tokens, seq_len, batch_size, max_batches)
    count = batch_size - sample_start if sample_count is None else sample_count
    _check_slice(sample_start, count, batch_size)
    data, _ = _array(tokens)
    for b in range(n):
        first = b * batch_size + sample_start
        offsets = np.arange(first, first + count, dtype=np.int64) * seq_len
        yield _windows(data, offsets, seq_len)
