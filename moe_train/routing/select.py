"""Top-k with ties broken to the lowest index, the same on every device.

`torch.topk` leaves the order of equal values unspecified (all-zero logits, e.g. padding rows,
may all pick the last experts). Here each value gets an integer key (its float32 bits made
monotone, then the index as the low digits, lower index = larger key), so every key is distinct
and the selection is unique; the values are gathered from `x`, so they keep its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_31 = 0x7FFFFFFF


def _order_key(x: Tensor, dim: int) -> Tensor:
    """int64 key: key(a) > key(b) iff x_a > x_b, or x_a == x_b and a has the lower index."""
    v = x.detach().to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0 (they compare equal)
    bits = v.view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ _LOW_31, bits)  # negative floats: reverse their order
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    rank = (n - 1 - torch.arange(n, device=x.device)).view(shape)
    return bits * n + rank


def topk_lowest_index(x: Tensor, k: int, dim: int = -1) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of x along dim, largest first, equal values
    in index order. x: float16/bfloat16/float32 (float64 falls back to a stable sort)."""
    if x.dtype == torch.float64:
        values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
        return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)
    indices = _order_key(x, dim).topk(k, dim=dim).indices
    return x.gather(dim, indices), indices
