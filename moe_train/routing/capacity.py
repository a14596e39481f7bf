"""Capacity: keep at most C slots per (routing group, expert), by priority. No Python loops."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(
    group_tokens: int, slots_per_token: int, num_experts: int, factor: float
) -> int:
    """C = ceil(tokens * k / E * capacity_factor), at least 1."""
    return max(1, math.ceil(group_tokens * slots_per_token / num_experts * factor))


def keep_within_capacity(
    bucket: Tensor, priority: Tensor, capacity: int | Tensor, num_buckets: int
) -> Tensor:
    """Mask [S] of slots kept when each bucket holds at most `capacity` slots.

    bucket:   [S] int64 bucket id (group * E + expert), in [0, num_buckets)
    priority: [S] higher is kept first; ties keep the earlier slot
    capacity: int, or [num_buckets] int64 per-bucket capacities
    """
    S = bucket.numel()
    if S == 0:
        return torch.ones(0, dtype=torch.bool, device=bucket.device)
    by_priority = torch.argsort(priority, descending=True, stable=True)
    by_bucket = torch.argsort(bucket[by_priority], stable=True)
    perm = by_priority[by_bucket]  # slots ordered by (bucket, priority)
    sorted_bucket = bucket[perm]
    counts = torch.bincount(sorted_bucket, minlength=num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(S, device=bucket.device) - starts[sorted_bucket]
    cap = capacity[sorted_bucket] if isinstance(capacity, Tensor) else capacity
    keep = torch.empty(S, dtype=torch.bool, device=bucket.device)
    keep[perm] = position < cap
    return keep
