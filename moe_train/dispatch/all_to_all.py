"""Autograd-aware variable-split all-to-all (the backward is the reverse all-to-all)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup) -> Tensor:
    """send_counts: [ep, c] int64 (c counts per destination) -> [ep, c] counts from each source."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def all_to_all_rows(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Rows of x: [sum(send_splits), ...] -> [sum(recv_splits), ...], no autograd."""
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return all_to_all_rows(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return all_to_all_rows(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Differentiable all_to_all_single over `group` with variable splits (zero-size is fine)."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)
