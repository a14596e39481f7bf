"""Gradient math: synchronisation over the layout, world scaling and global-norm clipping.

The loss each rank back-propagates is the mean over its own tokens; the step uses the gradient of
the mean of the per-rank losses, so every gradient is summed over the ranks that share it and
divided by the world size:
- dense parameters are replicated on every rank: SUM over the world / world;
- expert parameters live on one ep-rank and already hold the contributions of every token of
  their ep group (they came back through the all-to-all): SUM over the dp group / world.
Which of these functions a run calls (flat, DDP, FSDP) is decided once, by `parallelize`, in the
GradSync it returns (grad_sync.py). Every function here takes the bare model.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .dims import ParallelDims
from .errors import guarded
from .fsdp import local
from .groups import ProcessGroups
from .placement import is_expert_param

BUCKET_ELEMS = 1 << 24  # the flat path all-reduces gradients in buckets of at most this many


def unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) with tied parameters listed once, in module order."""
    return list(model.named_parameters(remove_duplicate=True))


def sync_all_gradients(model: nn.Module, dims: ParallelDims, groups: ProcessGroups) -> None:
    """After backward (and accumulation), replicated layout: every gradient, in flat buckets per
    dtype, as the module docstring says."""
    if not dims.distributed:
        return
    params = [p for _, p in unique_params(model) if p.requires_grad]
    _agree_on_presence(params)
    grads = [(p.grad, is_expert_param(p)) for p in params if p.grad is not None]
    reduce_sum_scaled([g for g, e in grads if not e], None, dims.world_size, "dense gradients")
    _sync_experts([g for g, e in grads if e], dims, groups)


def sync_expert_gradients(model: nn.Module, dims: ParallelDims, groups: ProcessGroups) -> None:
    """After backward, when DDP reduced the dense gradients during it: the experts only."""
    if not dims.distributed:
        return
    expert = [p.grad for _, p in unique_params(model) if is_expert_param(p)]
    _sync_experts([g for g in expert if g is not None], dims, groups)


def _agree_on_presence(params: list[nn.Parameter]) -> None:
    """A parameter with a gradient on any rank gets one (zeros) on every rank, so that every rank
    reduces the same tensors in the same order."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    guarded("all_reduce(grad presence)", lambda: dist.all_reduce(has, op=dist.ReduceOp.MAX))
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)


def _sync_experts(grads: list[Tensor], dims: ParallelDims, groups: ProcessGroups) -> None:
    if dims.dp > 1:
        reduce_sum_scaled(grads, groups.dp, dims.world_size, "expert gradients over the dp group")
    elif grads:
        torch._foreach_div_(grads, float(dims.world_size))


def reduce_sum_scaled(
    grads: list[Tensor], group: dist.ProcessGroup | None, divisor: int, what: str
) -> None:
    """grads <- SUM over `group` (None: the world) / divisor, in flat buckets per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        for bucket in buckets(tensors, BUCKET_ELEMS):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            guarded(f"all_reduce({what})", functools.partial(dist.all_reduce, flat, group=group))
            flat.div_(divisor)
            copy_flat_into(flat, bucket)


def copy_flat_into(flat: Tensor, tensors: list[Tensor]) -> None:
    """tensors <- consecutive slices of flat (the inverse of torch.cat of their reshape(-1))."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def buckets(tensors: list[Tensor], max_elems: int) -> list[list[Tensor]]:
    """Consecutive runs of tensors of at most max_elems elements (a larger tensor stands alone)."""
    out: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.numel() > max_elems:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return [b for b in out if b]


def clip_replicated_(
    model: nn.Module, max_norm: float, dims: ParallelDims, groups: ProcessGroups
) -> Tensor:
    """Global L2 norm of all gradients, each parameter counted once, replicated layout: dense
    grads are the same on every rank after sync; expert grads are summed over the ep group.
    Scales the grads by min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Call after sync."""
    params = [p for _, p in unique_params(model) if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]  # all of params (for the checker)
    dense = [g for p, g in zip(params, grads) if not is_expert_param(p)]
    expert = [g for p, g in zip(params, grads) if is_expert_param(p)]
    held = params or [p for _, p in unique_params(model)]
    dev = held[0].device if held else torch.device("cpu")
    exp_sq = _sum_of_squares(expert, dev)
    if dims.ep > 1:
        guarded(
            "all_reduce(expert grad norm)",
            lambda: dist.all_reduce(exp_sq, group=groups.ep),
            "the ep group",
        )
    norm = (_sum_of_squares(dense, dev) + exp_sq).sqrt()
    _scale_to(norm, grads, max_norm)
    return norm


def clip_sharded_(model: nn.Module, max_norm: float) -> Tensor:
    """clip_replicated_ for an FSDP model: every gradient element lives on exactly one rank (dense
    sharded over the world, experts sharded over edp and distinct over ep), so the squared norm
    is the SUM over the world of each rank's local-shard squares: one all-reduce."""
    grads = [local(p.grad) for _, p in unique_params(model) if p.grad is not None]
    dev = grads[0].device if grads else torch.device("cpu")
    sq = _sum_of_squares(grads, dev)
    guarded("all_reduce(grad norm)", lambda: dist.all_reduce(sq))
    norm = sq.sqrt()
    _scale_to(norm, grads, max_norm)
    return norm


def _scale_to(norm: Tensor, grads: list[Tensor], max_norm: float) -> None:
    """grads *= min(1, max_norm / (norm + 1e-6)) when max_norm > 0."""
    if max_norm > 0 and grads:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def _sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def agree_on_overflow(found_inf: list[Tensor]) -> None:
    """fp16 loss scaling: one overflow decision for the whole world. Each rank's `found_inf`
    flags (one per device, from GradScaler.unscale_) become their MAX over all ranks, in place,
    so every rank skips the same steps and GradScaler.update() keeps one scale everywhere (an
    overflow in one rank's experts would otherwise halve only that rank's scale)."""
    if not found_inf or not (dist.is_available() and dist.is_initialized()):
        return
    flag = torch.stack([f.float().reshape(()) for f in found_inf]).max()
    guarded("all_reduce(found_inf)", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
    for f in found_inf:
        f.fill_(flag.item())
