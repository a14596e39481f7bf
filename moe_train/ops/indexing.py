"""Index counting that stays on the device (no host sync on CUDA)."""

from __future__ import annotations

import torch
from torch import Tensor


def count_values(index: Tensor, n: int) -> Tensor:
    """[n] int64: how often each value in [0, n) occurs in index [S] (int64).

    torch.bincount on CPU (fastest there); a scatter-add elsewhere, because CUDA's bincount reads
    the largest value on the host (a sync) to size its output; and under torch.compile, where
    bincount's data-dependent size would break the graph."""
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.bincount(index, minlength=n)
    out = torch.zeros(n, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int64))
