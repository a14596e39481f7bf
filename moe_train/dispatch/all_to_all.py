"""Autograd-aware variable-split all-to-all (the backward is the reverse all-to-all).

Every call goes through `guarded`, so a dead or missing peer raises a CollectiveError naming the
collective after the process-group timeout (parallel.timeout_s) instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..parallel.errors import guarded


def all_to_all_rows(
    x: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup,
    name: str = "MoE rows",
) -> Tensor:
    """Rows of x: [sum(send_splits), ...] -> [sum(recv_splits), ...], no autograd."""
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    guarded(
        f"all_to_all_single({name})",
        lambda: dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group),
        "the expert-parallel group",
    )
    return out


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup) -> Tensor:
    """send_counts: [n, c] int64 (c counts per destination) -> [n, c] counts from each source:
    one row to every rank of the group."""
    ones = [1] * send_counts.shape[0]
    return all_to_all_rows(send_counts, ones, ones, group, "MoE split sizes")


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group, name: str):
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.name = (
            send_splits,
            recv_splits,
            group,
            name,
        )
        return all_to_all_rows(x, send_splits, recv_splits, group, name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = all_to_all_rows(grad, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.name + " grad")
        return g, None, None, None, None


def all_to_all(
    x: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup,
    name: str = "MoE rows",
) -> Tensor:
    """Differentiable all_to_all_single over `group` with variable splits (zero-size is fine)."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, name)


@dataclass(frozen=True)
class Splits:
    """Per-peer counts of one hop: token rows and slots this rank sends to / receives from each
    rank of the group (host ints, as all_to_all_single wants them)."""

    send_rows: list[int]
    recv_rows: list[int]
    send_slots: list[int]
    recv_slots: list[int]


# ---- async: start now, wait where the result is needed -------------------------------------------
@dataclass
class Pending:
    """One asynchronous exchange in flight (forward `work`, and in backward the reverse one's),
    with the buffers it reads and writes kept alive until it is waited for."""

    name: str
    work: Any = None
    keep: list[Tensor] = field(default_factory=list)
    back_work: Any = None
    back_out: Tensor | None = None
    back_keep: list[Tensor] = field(default_factory=list)


def _start(out: Tensor, x: Tensor, out_splits: list[int], in_splits: list[int], group, name: str):
    return guarded(
        f"all_to_all_single({name})",
        lambda: dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True),
        "the expert-parallel group",
    )


def _wait(work: Any, name: str) -> None:
    if work is not None:
        guarded(f"wait(all_to_all_single({name}))", work.wait, "the expert-parallel group")


def start_rows(
    x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup, name: str
) -> tuple[Tensor, Pending]:
    """Start moving rows of x: [sum(send), ...] -> [sum(recv), ...] without autograd; the result
    is valid after wait_rows(pending)."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    x = x.contiguous()
    pending = Pending(name, keep=[x])
    pending.work = _start(out, x, recv, send, group, name)
    return out, pending


def wait_rows(pending: Pending) -> None:
    _wait(pending.work, pending.name)
    pending.work, pending.keep = None, []


class _StartAllToAll(torch.autograd.Function):
    """Forward: start the exchange, return the (not yet written) output. Backward: wait for the
    reverse exchange that _WaitAllToAll's backward started, return its result."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group, pending: Pending):
        ctx.pending = pending
        out, started = start_rows(x, send, recv, group, pending.name)
        pending.work, pending.keep = started.work, started.keep
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: _WaitAllToAll's placeholder
        p: Pending = ctx.pending
        _wait(p.back_work, p.name + " grad")
        out, p.back_out, p.back_work, p.back_keep = p.back_out, None, None, []
        return out, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange, pass the rows through. Backward: START the reverse
    exchange of the gradient (waited for in _StartAllToAll's backward), so autograd can run
    other ready nodes, e.g. this rank's own experts' backward, while it is in flight."""

    @staticmethod
    def forward(ctx, rows: Tensor, send: list[int], recv: list[int], group, pending: Pending):
        wait_rows(pending)
        ctx.send, ctx.recv, ctx.group, ctx.pending = send, recv, group, pending
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p: Pending = ctx.pending
        out, started = start_rows(grad, ctx.recv, ctx.send, ctx.group, p.name + " grad")
        p.back_out, p.back_work, p.back_keep = out, started.work, started.keep
        # to _StartAllToAll's backward, which returns `out` once written (this is a placeholder
        # of the rows' shape: the reverse exchange is still in flight)
        return grad, None, None, None, None


def all_to_all_start(
    x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup, name: str
) -> tuple[Tensor, Pending]:
    """Differentiable async all_to_all_single: (rows in flight, handle). Use the rows only
    through all_to_all_wait(rows, handle, ...); the backward overlaps the same way."""
    pending = Pending(name)
    return _StartAllToAll.apply(x, send, recv, group, pending), pending


def all_to_all_wait(
    rows: Tensor, pending: Pending, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Wait for all_to_all_start's exchange; the received rows, differentiable."""
    return _WaitAllToAll.apply(rows, send, recv, group, pending)


class _ReceivedWeights(torch.autograd.Function):
    """Slot weights that arrived packed with their metadata (no autograd on the way): forward
    passes the received values through; backward sends their gradient back to the senders."""

    @staticmethod
    def forward(ctx, sent: Tensor, received: Tensor, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return received.to(sent.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = all_to_all_rows(
            grad.unsqueeze(1), ctx.recv, ctx.send, ctx.group, "MoE slot weights grad"
        ).squeeze(1)
        return g, None, None, None, None


def received_weights(
    sent: Tensor, received: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> Tensor:
    """sent: [S] weights this rank sent (requires grad), received: [S_in] the values that came in
    -> [S_in], whose gradient flows back to `sent` through the reverse all-to-all."""
    return _ReceivedWeights.apply(sent, received, send, recv, group)


def pack_slots(row: Tensor, local_expert: Tensor, weight: Tensor) -> Tensor:
    """[S] row, local expert (int64), weight (float32) -> [S, 3] int32 (the weight's bits): one
    exchange of 12 bytes per slot for the slot metadata and weights."""
    bits = weight.detach().float().view(torch.int32)
    return torch.stack([row.to(torch.int32), local_expert.to(torch.int32), bits], 1)


def unpack_slots(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pack_slots' inverse: [S, 3] int32 -> row, local expert [S] int64, weight [S] float32."""
    rows, experts = packed[:, 0].long(), packed[:, 1].long()
    return rows, experts, packed[:, 2].contiguous().view(torch.float32)
