"""Training-state bytes: measured from this rank's tensors (the trainer's `mem/state_bytes`) and
predicted from parameter shapes and the sharding rule (the planner's `state_bytes_per_gpu`).

State = parameters + gradients + optimizer state, local shards only (a DTensor counts its local
tensor, unpadded). FSDP2 shards a dense parameter on dim 0 over the world and a stacked expert
weight on dim 1 over the ranks holding the same experts (moe_train.parallel.fsdp), with
torch.chunk semantics: chunks of ceil(n / ranks) rows, the last ones shorter or empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .fsdp import local

F32 = 4  # parameters, gradients and optimizer state are fp32 (compute copies are transient)


def _nbytes(t: Tensor) -> int:
    t = local(t)
    return t.numel() * t.element_size()


def persistent_buffers(model: nn.Module) -> list[Tensor]:
    """The buffers a checkpoint holds (persistent ones: the routers' balancing bias), each once."""
    out = []
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                out.append(b)
    return list({id(b): b for b in out}.values())


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of the persistent buffers (fp32 state outside the optimizer; never sharded)."""
    return sum(b.numel() * b.element_size() for b in persistent_buffers(model))


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's parameter, gradient, optimizer-state and persistent-buffer bytes, measured from
    the tensors it holds (each tensor once, tied parameters once)."""
    params = list(dict.fromkeys(model.parameters()))  # unique, in order
    grads = [p.grad for p in params if p.grad is not None]
    seen: set[int] = set()
    optim = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, Tensor) and id(v) not in seen:
                seen.add(id(v))
                optim += _nbytes(v)
    out = {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(g) for g in grads),
        "optimizer": optim,
        "buffers": buffer_bytes(model),
    }
    return {**out, "total": sum(out.values())}


# ---- the prediction ------------------------------------------------------------------------------
def chunk_len(n: int, ranks: int, coord: int) -> int:
    """Length of chunk `coord` when torch.chunk splits n rows into `ranks` chunks."""
    size = math.ceil(n / ranks) if n else 0
    return max(0, min(size, n - coord * size))


def local_numel(shape: Iterable[int], dim: int | None, ranks: int, coord: int = 0) -> int:
    """Elements of the local shard of a tensor of `shape` sharded on `dim` (None: not sharded)."""
    shape = list(shape)
    if dim is not None and ranks > 1 and shape:
        shape[dim] = chunk_len(shape[dim], ranks, coord)
    return math.prod(shape)


def predicted_state_bytes(
    shapes: list[tuple[tuple[int, ...], bool]],
    *,
    optimizer: str,
    fsdp: bool,
    world: int,
    ep: int,
    buffers: int = 0,
) -> dict[str, int]:
    """The state bytes of rank 0 (which holds the largest chunks) for parameters given as
    (shape, is_expert), in the trainer's layout: fsdp shards dense on dim 0 over the world and
    experts on dim 1 over world/ep ranks; fp32 parameters and gradients; AdamW two fp32 moments
    and a step, Adafactor a row and a column statistic (or a full one for vectors) and a step.
    Optimizer state is sharded like its parameter (the same placement applied to its shape)."""
    params = optim = 0
    for shape, expert in shapes:
        ranks = (world // ep if expert else world) if fsdp else 1
        dim = (1 if expert and len(shape) >= 2 else 0) if ranks > 1 else None
        n = local_numel(shape, dim, ranks)
        params += F32 * n
        optim += F32  # the step counter: a 0-dim fp32 tensor per parameter
        if optimizer == "adafactor" and len(shape) > 1:
            row, col = (*shape[:-1], 1), (*shape[:-2], 1, shape[-1])
            optim += F32 * (local_numel(row, dim, ranks) + local_numel(col, dim, ranks))
        elif optimizer == "adafactor":
            optim += F32 * n
        else:
            optim += 2 * F32 * n
    out = {"params": params, "grads": params, "optimizer": optim, "buffers": buffers}
    return {**out, "total": sum(out.values())}


def predicted_zero_state_bytes(
    shapes: list[tuple[tuple[int, ...], bool]],
    *,
    zero_stage: int,
    world: int,
    ep: int,
    lp_bytes: int = F32,
) -> dict[str, int]:
    """The state bytes of one rank under DeepSpeed ZeRO 1/2 with AdamW (the DeepSpeed engine's
    `mem/state_bytes`, moe_train.engines.deepspeed_state.zero_state_bytes): per optimizer group
    (dense/expert x decay/no-decay, moe_train.training.optim) the group is flattened, padded to a
    multiple of 2 x ranks and split evenly over its ranks (dense: the world; experts: world/ep).
    Every rank keeps the whole low-precision copy (lp_bytes per element) and an fp32 partition
    of master weights, of gradients (stage 2; stage 1: whole low-precision gradients) and of
    AdamW's two moments, plus one fp32 step per group."""
    groups: dict[tuple[bool, bool], int] = {}
    for shape, expert in shapes:
        key = (expert, len(shape) >= 2)
        groups[key] = groups.get(key, 0) + math.prod(shape)
    params = grads = optim = 0
    for (expert, _), numel in groups.items():
        ranks = world // ep if expert else world
        padded = math.ceil(numel / (2 * ranks)) * 2 * ranks
        part = padded // ranks
        params += lp_bytes * padded + F32 * part
        grads += F32 * part if zero_stage >= 2 else lp_bytes * padded
        optim += 2 * F32 * part + F32
    out = {"params": params, "grads": grads, "optimizer": optim}
    return {**out, "total": sum(out.values())}


def model_shapes(model: nn.Module) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, is_expert) of every unique parameter of a (meta-built) model."""
    from .placement import is_expert_param

    return [(tuple(p.shape), is_expert_param(p)) for p in dict.fromkeys(model.parameters())]
