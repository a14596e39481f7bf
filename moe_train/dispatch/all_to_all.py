"""Autograd-aware variable-split all-to-all (the backward is the reverse all-to-all).

Every call goes through `guarded`, so a dead or missing peer raises a CollectiveError naming the
collective after the process-group timeout (parallel.timeout_s) instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class _DispatchAllToAll(torch.autograd.Function):
    """Token rows and slot weights in one autograd node, so that every rank runs the backward
    collectives of a layer in the same order (two separate nodes could be reached in different
    orders on different ranks and deadlock)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, splits: Splits, group):
        ctx.splits, ctx.group = splits, group
        out_x = all_to_all_rows(x, splits.send_rows, splits.recv_rows, group, "MoE dispatch rows")
        out_w = all_to_all_rows(
            w.unsqueeze(1), splits.send_slots, splits.recv_slots, group, "MoE slot weights"
        )
        return out_x, out_w.squeeze(1)

    @staticmethod
    def backward(ctx, gx: Tensor, gw: Tensor):
        s, g = ctx.splits, ctx.group
        dx = all_to_all_rows(gx, s.recv_rows, s.send_rows, g, "MoE dispatch rows grad")
        dw = all_to_all_rows(
            gw.unsqueeze(1), s.recv_slots, s.send_slots, g, "MoE slot weights grad"
        )
        return dx, dw.squeeze(1), None, None


def dispatch_all_to_all(
    x: Tensor, w: Tensor, splits: Splits, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """x: [R, d] rows, w: [S] slot weights -> received (rows, weights), differentiable in both."""
    return _DispatchAllToAll.apply(x, w, splits, group)
