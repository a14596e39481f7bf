"""Assignment -> expert inputs -> expert outputs -> combined token outputs, local or across ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..ops.indexing import count_values
from ..parallel.dims import ParallelDims
from ..parallel.groups import ProcessGroups
from ..parallel.placement import ExpertShard
from ..routing import Assignment
from .all_to_all import (
    Splits,
    all_to_all,
    all_to_all_start,
    all_to_all_wait,
    exchange_counts,
    pack_slots,
    received_weights,
    start_rows,
    unpack_slots,
    wait_rows,
)
from .layout import plan_send, sort_by_expert

# rows sorted by local expert, counts per local expert ([E_local] int64 tensor) -> outputs
ExpertFn = Callable[[Tensor, Tensor], Tensor]

_META_BYTES_PER_SLOT = 3 * 4  # (row, local expert, weight bits) packed as int32
ROWS, META = "MoE dispatch rows", "MoE slot metadata and weights"

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


class Slots(NamedTuple):
    """Kept slots of one hop: token (row of the hop's input), expert id local to the hop, weight;
    each [S]."""

    token: Tensor
    expert: Tensor
    weight: Tensor


# the receiver side of one hop: (rows [R, d], the slots naming them) -> partial outputs [R, d]
Inner = Callable[[Tensor, Slots], Tensor]


@dataclass(frozen=True)
class Hop:
    """One all-to-all round trip over `group`, whose rank i holds experts
    [i * experts_per_dest, (i + 1) * experts_per_dest) (ids local to the hop).

    me: my index in the group; node_of: group index -> node, to count inter-node bytes;
    first: the hop that takes the token payload off this rank (counted as dispatch rows).
    own_local: the slots bound for my own index skip the exchange and run from x while the rest
    travels (the hops whose receiver runs experts; the cross-node hop of the hierarchical
    all-to-all sends its own chunk through the exchange, so the intra-node hop runs once).
    """

    group: dist.ProcessGroup
    experts_per_dest: int
    me: int
    node_of: Callable[[int], int]
    first: bool
    own_local: bool = True


class Dispatcher:
    """Moves token rows to the experts that the Assignment names and sums their outputs back.

    Built from a placement value (`ExpertShard`), never from a process group: ep-rank r of ep holds
    experts [r*E/ep, (r+1)*E/ep). With ep 1 everything is local and no group is needed; with ep > 1
    `moe_train.parallel.parallelize` hands the groups over (`connect`) before the first call. Each
    token is sent once per rank that holds any of its experts; the receiver runs them and sums the
    weighted partial outputs per row before the reverse all-to-all, so the return trip is one row
    per (token, rank) too.

    Hierarchical (node groups connected): the ep group is split into nodes of `ranks_per_node`
    ranks. Hop 1 crosses nodes: one row per (token, destination NODE), sent to the rank with the
    same local index on that node. Hop 2 stays inside the node: the row goes once to each local
    rank holding its experts. The return trip reduces inside the node first, then crosses once.

    Stats (per call, this rank): dispatch_rows/bytes = rows in the first-hop send buffer (incl.
    rows kept on this rank; the token payload); token_bytes = token rows this rank sends to other
    ranks, dispatch and return; send/recv_bytes = token_bytes + slot metadata; inter_node_bytes =
    the part of send_bytes that leaves the node (when ranks_per_node is known), inter_node_rows
    the dispatch rows among it (one per (token, remote node) when hierarchical); expert_slots =
    slots this rank's experts computed.
    """

    # this rank's own slots skip the exchange and overlap it (False: every chunk goes through the
    # exchange and nothing overlaps it; benchmarks/scaling.py's "before")
    overlap: bool = True

    def __init__(self, num_experts: int, shard: ExpertShard | None = None):
        self.num_experts = num_experts
        self.shard = shard or ExpertShard()
        self.num_local = self.shard.num_local(num_experts)  # raises when E does not split
        self.first_expert = self.shard.first_expert(num_experts)
        self.group: dist.ProcessGroup | None = None
        self.ranks_per_node: int | None = None
        self.intra_group: dist.ProcessGroup | None = None
        self.inter_group: dist.ProcessGroup | None = None

    @property
    def ep(self) -> int:
        return self.shard.ep_size

    @property
    def ep_rank(self) -> int:
        return self.shard.ep_rank

    def connect(self, dims: ParallelDims, groups: ProcessGroups) -> None:
        """Take the layout's groups: the ep group, and the node groups of the hierarchical
        all-to-all (intra: my node's ep ranks by local index; inter: the ep ranks with my local
        index, by node). Called by moe_train.parallel.parallelize."""
        if dims.expert_shard != self.shard:
            raise ValueError(
                f"the MoE layer was built for {self.shard} but the layout places this rank at "
                f"{dims.expert_shard}: build the model with shard=dims.expert_shard"
            )
        if self.ep > 1 and (groups.ep is None or dist.get_world_size(groups.ep) != self.ep):
            raise ValueError(
                f"parallel.ep={self.ep}: the expert-parallel group is missing or of "
                "another size; create the groups with build_process_groups(dims)"
            )
        rpn = dims.node_size
        if groups.intra_node is not None and (
            dist.get_world_size(groups.intra_node) != rpn or self.ep % rpn
        ):
            raise ValueError(
                f"parallel.ranks_per_node={rpn} does not split parallel.ep={self.ep} into whole nodes"
            )
        self.group, self.ranks_per_node = groups.ep, rpn
        self.intra_group, self.inter_group = groups.intra_node, groups.inter_node

    @property
    def hierarchical(self) -> bool:
        return self.intra_group is not None and self.ep > (self.ranks_per_node or self.ep)

    def __call__(
        self, x: Tensor, a: Assignment, experts: ExpertFn
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        """x: [T, d] -> (y [T, d], stats)."""
        stats: dict[str, float | Tensor] = dict.fromkeys(STAT_KEYS, 0.0)
        stats["slots"] = float(a.num_slots)
        slots = Slots(a.token, a.expert, a.weight)

        def leaf(rows: Tensor, s: Slots) -> Tensor:  # my local experts on the rows they got
            order, counts = sort_by_expert(s.expert, self.num_local)
            stats["expert_slots"] += counts.sum()  # a tensor: read at log steps only
            row = s.token[order]
            # the expert input in the autocast dtype: the gather casts on the way (one pass)
            buf = ops.dispatch(rows, row, compute_dtype(rows))  # [S, d] sorted by local expert
            return ops.combine(experts(buf, counts), s.weight[order], row, rows.shape[0])

        if self.ep == 1:
            # tokens with any kept slot, as a tensor: no host sync in the forward pass
            rows = (count_values(a.token, x.shape[0]) > 0).sum()
            stats["dispatch_rows"] = rows
            stats["dispatch_bytes"] = rows * x.shape[1] * x.element_size()
            return leaf(x, slots), stats
        if self.group is None:
            raise RuntimeError(
                f"MoE dispatcher for ep-rank {self.ep_rank} of parallel.ep={self.ep} has no "
                "process group: call moe_train.parallel.parallelize(model, dims, groups, cfg) "
                "before the first forward"
            )
        if not self.hierarchical:
            rpn = self.ranks_per_node or self.ep
            flat = Hop(self.group, self.num_local, self.ep_rank, lambda r: r // rpn, first=True)
            return self._hop(x, slots, flat, leaf, stats), stats
        return self._two_hops(x, slots, leaf, stats), stats

    def _two_hops(self, x: Tensor, slots: Slots, leaf: Inner, stats: dict) -> Tensor:
        """Across nodes (one row per destination node), then inside the destination node."""
        rpn = self.ranks_per_node
        assert rpn is not None and self.inter_group is not None and self.intra_group is not None
        me_node, me_local = divmod(self.ep_rank, rpn)
        inside = Hop(self.intra_group, self.num_local, me_local, lambda r: 0, first=False)
        across = Hop(
            self.inter_group, self.num_local * rpn, me_node, lambda n: n, True, own_local=False
        )

        def intra(rows: Tensor, s: Slots) -> Tensor:
            return self._hop(rows, s, inside, leaf, stats)

        return self._hop(x, slots, across, intra, stats)

    def _hop(self, x: Tensor, slots: Slots, hop: Hop, inner: Inner, stats: dict) -> Tensor:
        """One all-to-all round trip: rows of x to the other group ranks holding the slots'
        experts (once per (row, destination)), `inner` on the receiver, partial sums back, and the
        sum per row. x: [T, d]; slots [S] with expert ids local to this hop.

        The slots bound for this rank's own experts never enter the exchange: `inner` computes
        them straight from x while the other ranks' rows are in flight (async all-to-all; in
        backward their gradient's reverse all-to-all likewise overlaps their backward)."""
        T, d = x.shape
        n, me = dist.get_world_size(hop.group), hop.me
        plan = plan_send(slots.token, slots.expert, T, hop.experts_per_dest, n)
        counts = torch.stack([plan.row_splits, plan.slot_splits], 1)  # [n, 2] rows, slots
        own_local = hop.own_local and self.overlap
        to_peers = counts.clone()
        if own_local:
            to_peers[me] = 0  # mine stay here
        recv_counts = exchange_counts(to_peers, hop.group)  # [n, 2] from each source
        full = read_splits(counts, recv_counts)  # the hop's one device-to-host read
        splits = full
        r0 = r1 = s0 = s1 = 0  # my own chunk of rows and slots (empty: it travels too)
        if own_local:
            splits = replace(
                full,
                send_rows=[0 if i == me else c for i, c in enumerate(full.send_rows)],
                send_slots=[0 if i == me else c for i, c in enumerate(full.send_slots)],
            )
            r0, s0 = sum(full.send_rows[:me]), sum(full.send_slots[:me])
            r1, s1 = r0 + full.send_rows[me], s0 + full.send_slots[me]

        # send rows and slots: everything but my own chunk (rows and slots ordered by dest)
        row_token = plan.row_tokens(sum(full.send_rows))  # [R]
        remote_token = torch.cat([row_token[:r0], row_token[r1:]])
        w_sorted = slots.weight[plan.slot_order]  # [S] by destination
        w_sent = torch.cat([w_sorted[:s0], w_sorted[s1:]])
        packed = pack_slots(
            torch.cat([plan.slot_row[:s0], plan.slot_row[s1:]]),
            torch.cat([plan.slot_local_expert[:s0], plan.slot_local_expert[s1:]]),
            w_sent,
        )
        g = hop.group
        sent = ops.dispatch(x, remote_token)  # [R - R_me, d]
        rows_in, rows_pending = all_to_all_start(sent, splits.send_rows, splits.recv_rows, g, ROWS)
        meta, meta_pending = start_rows(packed, splits.send_slots, splits.recv_slots, g, META)

        # my own experts on my own slots, while the rows travel
        own = None
        if own_local:
            mine = slots_of_rank(slots, plan.slot_order[s0:s1], plan.slot_local_expert[s0:s1])
            own = inner(x, mine)  # [T, d]

        # receiver: slot -> row of the received rows; the experts behind this hop
        recv_x = all_to_all_wait(rows_in, rows_pending, splits.send_rows, splits.recv_rows, g)
        wait_rows(meta_pending)
        slot_row, local_expert, weight = unpack_slots(meta)
        recv_w = received_weights(w_sent, weight, splits.send_slots, splits.recv_slots, g)
        partial = inner(recv_x, Slots(receiver_rows(slot_row, splits), local_expert, recv_w))

        # reverse all-to-all, then sum each row's partial outputs over destinations and mine
        back = all_to_all(partial, splits.recv_rows, splits.send_rows, g, "MoE return rows")
        _count(stats, hop, full, d * x.element_size())
        y = ops.combine(back, None, remote_token, T)
        return y if own is None else y + own


def slots_of_rank(slots: Slots, picked: Tensor, local_expert: Tensor) -> Slots:
    """The slots `picked` (indices into slots), with their expert ids local to the rank."""
    return Slots(slots.token[picked], local_expert, slots.weight[picked])


def read_splits(send_counts: Tensor, recv_counts: Tensor) -> Splits:
    """send_counts, recv_counts: [n, 2] (rows, slots) per peer -> Splits, in ONE device-to-host
    read of the stacked counts (four separate reads would each wait for the device)."""
    send_rows, send_slots, recv_rows, recv_slots = (
        torch.cat([send_counts, recv_counts.to(send_counts.device)], 1).t().tolist()
    )
    return Splits(send_rows, recv_rows, send_slots, recv_slots)


def receiver_rows(slot_row: Tensor, s: Splits) -> Tensor:
    """slot_row: [S_in] row of each received slot within its source's chunk -> [S_in] row of the
    received buffer (chunks in source order), on the device without a host sync."""
    dev = slot_row.device
    n = len(s.recv_rows)
    source = torch.repeat_interleave(
        torch.arange(n, device=dev),
        torch.tensor(s.recv_slots, device=dev),
        output_size=sum(s.recv_slots),
    )
    starts = [0] * n
    for i in range(1, n):
        starts[i] = starts[i - 1] + s.recv_rows[i - 1]
    return torch.tensor(starts, device=dev)[source] + slot_row


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _count(stats: dict, hop: Hop, s: Splits, row_bytes: int) -> None:
    """Add one hop's rows and bytes to the stats (see Dispatcher)."""
    if hop.first:
        stats["dispatch_rows"] += float(sum(s.send_rows))
        stats["dispatch_bytes"] += float(sum(s.send_rows) * row_bytes)
    for peer in range(len(s.send_rows)):
        if peer == hop.me:
            continue
        # dispatch rows out + return rows out (the rows this peer sent us) + slot metadata
        tok_out = (s.send_rows[peer] + s.recv_rows[peer]) * row_bytes
        out = tok_out + s.send_slots[peer] * _META_BYTES_PER_SLOT
        tok_in = (s.recv_rows[peer] + s.send_rows[peer]) * row_bytes
        stats["token_bytes"] += float(tok_out)
        stats["send_bytes"] += float(out)
        stats["recv_bytes"] += float(tok_in + s.recv_slots[peer] * _META_BYTES_PER_SLOT)
        if hop.node_of(peer) != hop.node_of(hop.me):
            stats["inter_node_bytes"] += float(out)
            stats["inter_node_rows"] += float(s.send_rows[peer])
