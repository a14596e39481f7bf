"""Plain-PyTorch reference of the fused ops. Autograd comes from PyTorch itself."""

from __future__ import annotations

import torch
from torch import Tensor

from .hashing import Seed, noise_uniform


def dispatch_reference(x: Tensor, index: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """buf[i] = x[index[i]]. x: [T, d], index: [S] int64 -> [S, d] (cast to out_dtype)."""
    buf = x.index_select(0, index)
    return buf if out_dtype is None else buf.to(out_dtype)


def combine_reference(buf: Tensor, weight: Tensor | None, index: Tensor, num_rows: int) -> Tensor:
    """y[r] = sum over slots s with index[s] == r of weight[s] * buf[s]; accumulated in float32.

    buf: [S, d], weight: [S] or None (= ones), index: [S] int64 in [0, num_rows) -> [num_rows, d]
    in buf's dtype.
    """
    rows = buf.float()
    if weight is not None:
        rows = rows * weight.float().unsqueeze(1)
    y = torch.zeros(num_rows, buf.shape[1], dtype=torch.float32, device=buf.device)
    return y.index_add(0, index, rows).to(buf.dtype)


def jitter_reference(x: Tensor, seed: Seed, first_row: int | Tensor, eps: float) -> Tensor:
    """y[t, f] = x[t, f] * ((1 - eps) + 2 eps * u), u = noise_uniform(seed, first_row + t, f).
    x: [T, d] float32 -> [T, d]; the product and the sum are rounded separately, as the kernels do.
    first_row: an int, or a 0-d int64 tensor (compiled blocks: no constant to specialise on)."""
    T, d = x.shape
    rows = torch.arange(T, device=x.device) + first_row  # [T] global rows
    return x * noise_uniform(seed, rows, d).mul(2.0 * eps).add(1.0 - eps)
