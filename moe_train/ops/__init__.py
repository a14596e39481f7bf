"""Python face of the row-moving ops: dispatch (gather rows) and combine (weighted row sums).

The fused C++/CUDA kernels replace the references when they are built (kernels issue); until
then the plain-PyTorch references run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import combine_reference, dispatch_reference


def extension_available() -> bool:
    """True when the fused kernels are built and loaded."""
    return False


def dispatch(x: Tensor, index: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """buf[i] = x[index[i]]: x [T, d], index [S] int64 -> buf [S, d]."""
    return dispatch_reference(x, index, out_dtype)


def combine(buf: Tensor, weight: Tensor | None, index: Tensor, num_rows: int) -> Tensor:
    """y[r] = sum_{s: index[s] = r} weight[s] * buf[s]: buf [S, d] -> y [num_rows, d]."""
    return combine_reference(buf, weight, index, num_rows)


__all__ = ["combine", "dispatch", "extension_available"]
