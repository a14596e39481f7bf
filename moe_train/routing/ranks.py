"""Expected destination ranks of a token under uniform routing (the planner's traffic term).

Ranks hold consecutive expert ranges of n = E / ep experts each.
"""

from __future__ import annotations


def miss_probability(n_total: int, n_rank: int, k: int) -> float:
    """P(none of k distinct uniform picks out of n_total falls in a set of n_rank)."""
    p = 1.0
    for i in range(k):
        if n_total - i <= 0:
            return 0.0
        p *= max(0, n_total - n_rank - i) / (n_total - i)
    return p


def distinct_pick_ranks(num_experts: int, ep: int, k: int) -> float:
    """k distinct uniform experts of E (hypergeometric): ep * (1 - P(a rank holds none))."""
    return ep * (1 - miss_probability(num_experts, num_experts // ep, k))
