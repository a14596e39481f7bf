"""Capacity: keep at most C slots per (routing group, expert), by priority. No Python loops."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from ..ops.indexing import count_values


def exact_factor(factor: float) -> Fraction:
    """The capacity factor as the decimal the user wrote: 1.1 -> 11/10 (the float 1.1 is
    1.100000000000000088..., which would round 200 / 4 * 1.1 up to 56)."""
    return Fraction(str(float(factor)))


def expert_capacity(
    group_tokens: int, slots_per_token: int, num_experts: int, factor: float
) -> int:
    """C = ceil(tokens * k / E * capacity_factor), at least 1, in exact arithmetic."""
    f = exact_factor(factor)
    num = group_tokens * slots_per_token * f.numerator
    den = num_experts * f.denominator
    return max(1, -(-num // den))


def keep_within_capacity(
    bucket: Tensor, priority: Tensor, capacity: int | Tensor, num_buckets: int
) -> Tensor:
    """Mask [S] of slots kept when each bucket holds at most `capacity` slots.

    bucket:   [S] int64 bucket id (group * E + expert), in [0, num_buckets)
    priority: [S] higher is kept first; ties keep the earlier slot
    capacity: int, or [num_buckets] int64 per-bucket capacities
    """
    S = bucket.numel()
    if not torch.compiler.is_compiling() and S == 0:  # traced: S may be data-dependent
        return torch.ones(0, dtype=torch.bool, device=bucket.device)
    by_priority = torch.argsort(priority, descending=True, stable=True)
    by_bucket = torch.argsort(bucket[by_priority], stable=True)
    perm = by_priority[by_bucket]  # slots ordered by (bucket, priority)
    sorted_bucket = bucket[perm]
    counts = count_values(sorted_bucket, num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(S, device=bucket.device) - starts[sorted_bucket]
    cap = capacity[sorted_bucket] if isinstance(capacity, Tensor) else capacity
    keep = torch.empty(S, dtype=torch.bool, device=bucket.device)
    keep[perm] = position < cap
    return keep
