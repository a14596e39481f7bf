"""Assignment -> expert inputs -> expert outputs -> combined token outputs, local or across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..routing import Assignment
from .all_to_all import all_to_all, all_to_all_rows, exchange_counts
from .layout import plan_send, sort_by_expert

ExpertFn = Callable[[Tensor, list[int]], Tensor]  # rows sorted by local expert, counts -> outputs

_META_BYTES_PER_SLOT = 2 * 8 + 4  # (row, local expert) int64 + weight float32


class Dispatcher:
    """Moves token rows to the experts that the Assignment names and sums their outputs back.

    ep_group None (or of size 1): everything is local, the all-to-alls are skipped.
    Otherwise experts [r*E/ep, (r+1)*E/ep) live on ep-rank r; each token is sent once per rank that
    holds any of its experts; the receiver runs them and sums the weighted partial outputs per row
    before the reverse all-to-all, so the return trip is one row per (token, rank) too.
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup | None = None):
        self.num_experts = num_experts
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if num_experts % self.ep != 0:
            raise ValueError(
                f"model.num_experts={num_experts} is not divisible by parallel.ep={self.ep}; "
                "choose ep among the divisors of the expert count"
            )
        self.num_local = num_experts // self.ep
        self.first_expert = self.ep_rank * self.num_local

    def __call__(
        self, x: Tensor, a: Assignment, experts: ExpertFn
    ) -> tuple[Tensor, dict[str, float]]:
        """x: [T, d] -> (y [T, d], stats)."""
        if self.ep == 1:
            return self._local(x, a, experts)
        return self._expert_parallel(x, a, experts)

    def _local(
        self, x: Tensor, a: Assignment, experts: ExpertFn
    ) -> tuple[Tensor, dict[str, float]]:
        T = x.shape[0]
        order, counts = sort_by_expert(a.expert, self.num_local)
        token = a.token[order]
        out = experts(ops.dispatch(x, token), counts)  # [S, d]
        y = ops.combine(out, a.weight[order], token, T)
        return y, {"slots": float(a.num_slots)}

    def _expert_parallel(
        self, x: Tensor, a: Assignment, experts: ExpertFn
    ) -> tuple[Tensor, dict[str, float]]:
        T, d = x.shape
        ep, group = self.ep, self.group
        plan = plan_send(a.token, a.expert, T, self.num_local, ep)
        recv_counts = exchange_counts(torch.stack([plan.row_splits, plan.slot_splits], 1), group)
        send_rows, send_slots = plan.row_splits.tolist(), plan.slot_splits.tolist()
        recv_rows, recv_slots = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()

        # dispatch: one row per (token, destination rank); slot metadata and weights alongside
        recv_x = all_to_all(ops.dispatch(x, plan.row_token), send_rows, recv_rows, group)
        meta = torch.stack([plan.slot_row, plan.slot_local_expert], 1)  # [S, 2]
        meta = all_to_all_rows(meta, send_slots, recv_slots, group)
        weight = all_to_all(a.weight[plan.slot_order].unsqueeze(1), send_slots, recv_slots, group)
        weight = weight.squeeze(1)

        # receiver: fan rows out to local experts, sum weighted outputs per received row
        source = torch.repeat_interleave(torch.arange(ep, device=x.device), recv_counts[:, 1])
        row_start = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        row = row_start[source] + meta[:, 0]  # [S_in] row of recv_x
        order, counts = sort_by_expert(meta[:, 1], self.num_local)
        row = row[order]
        out = experts(ops.dispatch(recv_x, row), counts)
        partial = ops.combine(out, weight[order], row, recv_x.shape[0])  # [R_in, d]

        # reverse all-to-all, then sum each token's partial outputs over ranks
        back = all_to_all(partial, recv_rows, send_rows, group)
        y = ops.combine(back, None, plan.row_token, T)
        return y, self._stats(send_rows, recv_rows, send_slots, recv_slots, d, x.element_size(), a)

    def _stats(self, send_rows, recv_rows, send_slots, recv_slots, d, elem, a) -> dict[str, float]:
        me = self.ep_rank
        row_bytes = d * elem
        rows_out = sum(send_rows) - send_rows[me]  # rows leaving this rank
        rows_in = sum(recv_rows) - recv_rows[me]
        meta_out = (sum(send_slots) - send_slots[me]) * _META_BYTES_PER_SLOT
        meta_in = (sum(recv_slots) - recv_slots[me]) * _META_BYTES_PER_SLOT
        return {
            "slots": float(a.num_slots),
            "dispatch_rows": float(sum(send_rows)),  # incl. rows kept on this rank
            "dispatch_bytes": float(sum(send_rows) * row_bytes),
            # network bytes of the dispatch and the return trip (rows to/from other ranks) + metadata
            "send_bytes": float((rows_out + rows_in) * row_bytes + meta_out),
            "recv_bytes": float((rows_in + rows_out) * row_bytes + meta_in),
        }
