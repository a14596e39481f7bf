"""Where every slot goes: pure index math, no communication, no host sync.

A token is sent ONCE to each expert-parallel rank that holds any of its experts; the receiver fans
it out to its local experts. Rows of the send buffer are ordered by (destination rank, token).
Everything here stays on the device: the number of rows R is data-dependent, so the row tokens
are materialised only once the caller has read the per-destination counts on the host (the one
device-to-host read of a hop, moe_train.dispatch.dispatcher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..ops.indexing import count_values


@dataclass
class SendLayout:
    """The sender's plan for one layer call (every tensor on the slots' device).

    row_splits:  [n] rows sent to each rank
    slot_order:  [S] slots grouped by destination rank (stable)
    slot_row:    [S] (in slot_order) row index of the slot within its destination's chunk
    slot_local_expert: [S] (in slot_order) expert id local to the destination rank
    slot_splits: [n] slots sent to each rank
    Rows themselves (`row_tokens`) need R = row_splits.sum() on the host.
    """

    row_splits: Tensor
    slot_order: Tensor
    slot_row: Tensor
    slot_local_expert: Tensor
    slot_splits: Tensor
    _pair_sorted: Tensor  # [S] (dest * T + token) of the slots sorted by it
    _row_of_sorted: Tensor  # [S] global row index of each sorted slot
    _num_tokens: int

    def row_tokens(self, num_rows: int | None = None) -> Tensor:
        """[R] token index of each send row, rows grouped by destination rank then token.
        num_rows: R as a host int (None: read it from row_splits, a host sync)."""
        R = int(self.row_splits.sum()) if num_rows is None else num_rows
        out = self._pair_sorted.new_zeros(R)
        # every slot of a row writes the same token: the duplicates agree
        return out.scatter_(0, self._row_of_sorted, self._pair_sorted % self._num_tokens)


def plan_send(
    token: Tensor, expert: Tensor, num_tokens: int, experts_per_rank: int, ep: int
) -> SendLayout:
    """token, expert: [S] kept slots -> SendLayout (deduplicated per destination rank)."""
    dest = expert // experts_per_rank  # [S]
    pair = dest * num_tokens + token  # (rank, token): sorted, equal pairs share one send row
    by_pair = torch.argsort(pair, stable=True)
    pair_sorted = pair[by_pair]
    first = torch.ones_like(pair_sorted, dtype=torch.bool)  # [S] first slot of its row
    first[1:] = pair_sorted[1:] != pair_sorted[:-1]
    row_of_sorted = torch.cumsum(first, 0) - 1  # [S] global row of each sorted slot
    slot_to_row = torch.empty_like(row_of_sorted).scatter_(0, by_pair, row_of_sorted)
    dest_sorted = pair_sorted // num_tokens if num_tokens else pair_sorted
    row_splits = torch.zeros(ep, dtype=torch.int64, device=token.device)
    row_splits.scatter_add_(0, dest_sorted, first.to(torch.int64))
    row_start = torch.cumsum(row_splits, 0) - row_splits
    slot_order = torch.argsort(dest, stable=True)
    slot_dest = dest[slot_order]
    return SendLayout(
        row_splits=row_splits,
        slot_order=slot_order,
        slot_row=slot_to_row[slot_order] - row_start[slot_dest],
        slot_local_expert=expert[slot_order] - slot_dest * experts_per_rank,
        slot_splits=count_values(dest, ep),
        _pair_sorted=pair_sorted,
        _row_of_sorted=row_of_sorted,
        _num_tokens=num_tokens,
    )


def sort_by_expert(local_expert: Tensor, num_local: int) -> tuple[Tensor, Tensor]:
    """Stable order of slots by local expert [S] and the per-expert counts [num_local] int64, both
    on the slots' device (no host sync)."""
    return ops.group_by(local_expert, num_local)
