"""Where every slot goes: pure index math, no communication.

A token is sent ONCE to each expert-parallel rank that holds any of its experts; the receiver fans
it out to its local experts. Rows of the send buffer are ordered by (destination rank, token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops


@dataclass
class SendLayout:
    """The sender's plan for one layer call.

    row_token:   [R] token index of each send row, rows grouped by destination rank
    row_splits:  [ep] rows sent to each rank
    slot_order:  [S] slots grouped by destination rank
    slot_row:    [S] (in slot_order) row index of the slot within its destination's chunk
    slot_local_expert: [S] (in slot_order) expert id local to the destination rank
    slot_splits: [ep] slots sent to each rank
    """

    row_token: Tensor
    row_splits: Tensor
    slot_order: Tensor
    slot_row: Tensor
    slot_local_expert: Tensor
    slot_splits: Tensor


def plan_send(
    token: Tensor, expert: Tensor, num_tokens: int, experts_per_rank: int, ep: int
) -> SendLayout:
    """token, expert: [S] kept slots -> SendLayout (deduplicated per destination rank)."""
    dest = expert // experts_per_rank  # [S]
    pair = dest * num_tokens + token  # unique (rank, token) pairs, sorted by rank then token
    pairs, slot_to_row = torch.unique(pair, sorted=True, return_inverse=True)
    row_dest = pairs // num_tokens
    row_splits = torch.bincount(row_dest, minlength=ep)
    row_start = torch.cumsum(row_splits, 0) - row_splits
    slot_order = torch.argsort(dest, stable=True)
    slot_dest = dest[slot_order]
    return SendLayout(
        row_token=pairs % num_tokens,
        row_splits=row_splits,
        slot_order=slot_order,
        slot_row=slot_to_row[slot_order] - row_start[slot_dest],
        slot_local_expert=expert[slot_order] - slot_dest * experts_per_rank,
        slot_splits=torch.bincount(dest, minlength=ep),
    )


def sort_by_expert(local_expert: Tensor, num_local: int) -> tuple[Tensor, Tensor]:
    """Stable order of slots by local expert [S] and the per-expert counts [num_local] int64, both
    on the slots' device (no host sync)."""
    return ops.group_by(local_expert, num_local)
