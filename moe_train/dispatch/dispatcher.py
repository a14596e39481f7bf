"""Assignment -> expert inputs -> expert outputs -> combined token outputs, local or across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..routing import Assignment
from .all_to_all import all_to_all, all_to_all_rows, dispatch_all_to_all, exchange_counts
from .layout import plan_send, sort_by_expert

ExpertFn = Callable[[Tensor, list[int]], Tensor]  # rows sorted by local expert, counts -> outputs
# receiver side of one hop: (rows [R, d], slot row [S], slot expert id [S], slot weight [S]) -> [R, d]
_Inner = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

_META_BYTES_PER_SLOT = 2 * 8 + 4  # (row, local expert) int64 + weight float32

STAT_KEYS = (
    "slots",
    "dispatch_rows",
    "dispatch_bytes",
    "send_bytes",
    "recv_bytes",
    "token_bytes",
    "inter_node_bytes",
    "inter_node_rows",
    "expert_slots",
)


class Dispatcher:
    """Moves token rows to the experts that the Assignment names and sums their outputs back.

    ep_group None (or of size 1): everything is local, the all-to-alls are skipped.
    Otherwise experts [r*E/ep, (r+1)*E/ep) live on ep-rank r; each token is sent once per rank that
    holds any of its experts; the receiver runs them and sums the weighted partial outputs per row
    before the reverse all-to-all, so the return trip is one row per (token, rank) too.

    Hierarchical (`set_hierarchy`): the ep group is split into nodes of `ranks_per_node` ranks.
    Hop 1 crosses nodes: one row per (token, destination NODE), sent to the rank with the same
    local index on that node. Hop 2 stays inside the node: the row goes once to each local rank
    holding its experts. The return trip reduces inside the node first, then crosses nodes once.

    Stats (per call, this rank): dispatch_rows/bytes = rows in the first-hop send buffer (incl.
    rows kept on this rank; the token payload); token_bytes = token rows this rank sends to other
    ranks, dispatch and return; send/recv_bytes = token_bytes + slot metadata; inter_node_bytes =
    the part of send_bytes that leaves the node (when ranks_per_node is known), inter_node_rows
    the dispatch rows among it (one per (token, remote node) when hierarchical); expert_slots =
    slots this rank's experts computed.
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
        self.ranks_per_node: int | None = None
        self.intra_group: dist.ProcessGroup | None = None
        self.inter_group: dist.ProcessGroup | None = None

    def set_hierarchy(
        self,
        intra_group: dist.ProcessGroup | None,
        inter_group: dist.ProcessGroup | None,
        ranks_per_node: int,
    ) -> None:
        """Use the two-hop all-to-all. Groups: my node's ep ranks (ordered by local index) and the
        ep ranks with my local index (ordered by node). Both None: flat, only counting bytes."""
        self.ranks_per_node = ranks_per_node
        self.intra_group, self.inter_group = intra_group, inter_group
        if intra_group is not None:
            if dist.get_world_size(intra_group) != ranks_per_node or self.ep % ranks_per_node:
                raise ValueError(
                    f"parallel.ranks_per_node={ranks_per_node} does not split parallel.ep="
                    f"{self.ep} into whole nodes"
                )

    @property
    def hierarchical(self) -> bool:
        return self.intra_group is not None and self.ep > (self.ranks_per_node or self.ep)

    def __call__(
        self, x: Tensor, a: Assignment, experts: ExpertFn
    ) -> tuple[Tensor, dict[str, float]]:
        """x: [T, d] -> (y [T, d], stats)."""
        stats: dict[str, float | Tensor] = dict.fromkeys(STAT_KEYS, 0.0)
        stats["slots"] = float(a.num_slots)

        def leaf(rows: Tensor, row: Tensor, local_expert: Tensor, weight: Tensor) -> Tensor:
            order, counts = sort_by_expert(local_expert, self.num_local)
            stats["expert_slots"] += float(sum(counts))
            row = row[order]
            out = experts(ops.dispatch(rows, row), counts)  # [S, d] sorted by local expert
            return ops.combine(out, weight[order], row, rows.shape[0])

        if self.ep == 1:
            # tokens with any kept slot, as a tensor: no host sync in the forward pass
            rows = (torch.bincount(a.token, minlength=x.shape[0]) > 0).sum()
            stats["dispatch_rows"], stats["dispatch_bytes"] = (
                rows,
                rows * x.shape[1] * x.element_size(),
            )
            return leaf(x, a.token, a.expert, a.weight), stats
        if not self.hierarchical:
            rpn = self.ranks_per_node or self.ep
            y = self._hop(
                x,
                a.token,
                a.expert,
                a.weight,
                self.num_local,
                self.group,
                leaf,
                stats,
                node_of=lambda r: r // rpn,
                me=self.ep_rank,
                first=True,
            )
            return y, stats

        rpn = self.ranks_per_node
        assert rpn is not None
        per_node = self.num_local * rpn
        me_node, me_local = divmod(self.ep_rank, rpn)

        def intra(rows: Tensor, row: Tensor, node_expert: Tensor, weight: Tensor) -> Tensor:
            return self._hop(
                rows,
                row,
                node_expert,
                weight,
                self.num_local,
                self.intra_group,
                leaf,
                stats,
                node_of=lambda r: 0,
                me=me_local,
                first=False,
            )

        y = self._hop(
            x,
            a.token,
            a.expert,
            a.weight,
            per_node,
            self.inter_group,
            intra,
            stats,
            node_of=lambda n: n,
            me=me_node,
            first=True,
        )
        return y, stats

    def _hop(
        self,
        x: Tensor,
        token: Tensor,
        expert: Tensor,
        weight: Tensor,
        experts_per_dest: int,
        group: dist.ProcessGroup | None,
        inner: _Inner,
        stats: dict[str, float],
        node_of: Callable[[int], int],
        me: int,
        first: bool,
    ) -> Tensor:
        """One all-to-all round trip over `group`: rows of x to the group ranks holding the slots'
        experts (once per (row, destination)), `inner` on the receiver, partial sums back, and the
        sum per row. x: [T, d]; token/expert/weight: [S] slots (expert ids local to this hop)."""
        T, d = x.shape
        n = dist.get_world_size(group)
        plan = plan_send(token, expert, T, experts_per_dest, n)
        recv_counts = exchange_counts(torch.stack([plan.row_splits, plan.slot_splits], 1), group)
        send_rows, send_slots = plan.row_splits.tolist(), plan.slot_splits.tolist()
        recv_rows, recv_slots = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()

        # dispatch: one row per (row of x, destination); slot metadata and weights alongside
        recv_x, recv_w = dispatch_all_to_all(
            ops.dispatch(x, plan.row_token),
            weight[plan.slot_order],
            send_rows,
            recv_rows,
            send_slots,
            recv_slots,
            group,
        )
        meta = torch.stack([plan.slot_row, plan.slot_local_expert], 1)  # [S, 2]
        meta = all_to_all_rows(meta, send_slots, recv_slots, group, "MoE slot metadata")

        # receiver: slot -> row of recv_x; run the experts behind this hop, partial sums per row
        source = torch.repeat_interleave(
            torch.arange(n, device=x.device), recv_counts[:, 1].to(x.device)
        )
        row_start = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        row = row_start.to(x.device)[source] + meta[:, 0]  # [S_in] row of recv_x
        partial = inner(recv_x, row, meta[:, 1], recv_w)  # [R_in, d]

        # reverse all-to-all, then sum each row's partial outputs over destinations
        back = all_to_all(partial, recv_rows, send_rows, group, "MoE return rows")
        y = ops.combine(back, None, plan.row_token, T)
        self._count(
            stats,
            send_rows,
            recv_rows,
            send_slots,
            recv_slots,
            d * x.element_size(),
            node_of,
            me,
            first,
        )
        return y

    @staticmethod
    def _count(stats, send_rows, recv_rows, send_slots, recv_slots, row_bytes, node_of, me, first):
        if first:
            stats["dispatch_rows"] += float(sum(send_rows))
            stats["dispatch_bytes"] += float(sum(send_rows) * row_bytes)
        for peer in range(len(send_rows)):
            if peer == me:
                continue
            # dispatch rows out + return rows out (the rows this peer sent us) + slot metadata
            tok_out = (send_rows[peer] + recv_rows[peer]) * row_bytes
            out = tok_out + send_slots[peer] * _META_BYTES_PER_SLOT
            stats["token_bytes"] += float(tok_out)
            stats["send_bytes"] += float(out)
            stats["recv_bytes"] += float(
                (recv_rows[peer] + send_rows[peer]) * row_bytes
                + recv_slots[peer] * _META_BYTES_PER_SLOT
            )
            if node_of(peer) != node_of(me):
                stats["inter_node_bytes"] += float(out)
                stats["inter_node_rows"] += float(send_rows[peer])
