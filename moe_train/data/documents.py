"""Document boundaries inside a training window, from the document index written with the
tokens (the `.idx` of every shard or Megatron dataset; end-of-document tokens for flat files).

`BatchSampler.document_starts(step, row)` (or `TokenStream.document_starts(start, n)`) gives the
offsets in [0, T) where documents start inside a window, the first always 0. From them:

    ids = document_ids(starts, T)       # [T]: 0 0 0 1 1 2 ...: a token attends to its own id only
    lengths = document_lengths(starts, T)  # [k]: 3 2 1 ...: what varlen / flex attention take

A block-diagonal causal mask is `(ids[:, None] == ids[None, :]) & causal`; positions restarting
at each document are `arange(T) - starts[ids]`.

With data.document_mask a batch carries only those positions, `[B, T]` int64 (`window_positions`):
they restart at 0 at every document start, so the model gets its RoPE (or learned) positions
from them and its block-diagonal mask too (a new document wherever a position is 0:
moe_train/model/attention.py `document_causal_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def document_ids(starts: np.ndarray, n: int) -> np.ndarray:
    """[n] int64: the index (0, 1, ...) of the document piece each token of a window belongs to."""
    marks = np.zeros(n, dtype=np.int64)
    marks[np.asarray(starts[1:], dtype=np.int64)] = 1
    return np.cumsum(marks)


def document_lengths(starts: np.ndarray, n: int) -> np.ndarray:
    """[k] int64: the length of each document piece of a window (they sum to n)."""
    return np.diff(np.append(np.asarray(starts, dtype=np.int64), n))


def positions(starts: np.ndarray, n: int) -> np.ndarray:
    """[n] int64: each token's position inside its document piece (restarting at 0)."""
    starts = np.asarray(starts, dtype=np.int64)
    return np.arange(n, dtype=np.int64) - starts[document_ids(starts, n)]


def window_positions(starts: Sequence[np.ndarray], n: int) -> torch.Tensor:
    """[len(starts), n] int64: the positions of each row's tokens inside their document piece,
    from each row's document starts (offsets in [0, n), the first 0)."""
    out = np.empty((len(starts), n), dtype=np.int64)
    for r, row in enumerate(starts):
        out[r] = positions(row, n)
    return torch.from_numpy(out)
