"""Expert groups: score each group of consecutive experts, keep the best, mask the rest.

One machinery for SAM (one group, a group's score = the sum of its softmax) and topk's
group-limited routing (DeepSeek-V3: topk_groups groups, a group's score = the sum of its top-2
choice scores). Ties go to the lowest group, as everywhere (select.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .select import topk_lowest_index

GROUP_TOP = 2  # DeepSeek-V3 scores a group by the sum of its 2 best experts


def group_scores(scores: Tensor, num_groups: int, top: int | None = None) -> Tensor:
    """scores [T, E] -> [T, G]: each group's sum over all its E/G experts (top=None) or over its
    `top` best (fewer when a group is smaller)."""
    T, E = scores.shape
    grouped = scores.view(T, num_groups, E // num_groups)  # [T, G, n]
    if top is None:
        return grouped.sum(dim=-1)
    best, _ = topk_lowest_index(grouped, min(top, grouped.shape[-1]), dim=-1)
    return best.sum(dim=-1)


def best_groups(scores: Tensor, num_groups: int, keep: int, top: int | None = None) -> Tensor:
    """[T, keep] ids of each token's `keep` best groups by group_scores (best first)."""
    return topk_lowest_index(group_scores(scores, num_groups, top), keep)[1]


def limit_to_groups(scores: Tensor, num_groups: int, keep: int, top: int = GROUP_TOP) -> Tensor:
    """scores [T, E] with every expert outside the token's `keep` best groups set to -inf, so a
    top-k over the result chooses inside them only (DeepSeek-V3's group-limited routing)."""
    T, E = scores.shape
    chosen = best_groups(scores, num_groups, keep, top)  # [T, keep]
    in_group = torch.zeros(T, num_groups, dtype=torch.bool, device=scores.device)
    in_group.scatter_(1, chosen, True)
    in_group = in_group.repeat_interleave(E // num_groups, dim=1)  # [T, E]
    return scores.masked_fill(~in_group, float("-inf"))
