"""Layout-invariant initialisation: which generator each parameter draws from, and which part of
the drawn value this rank keeps. The values themselves are the modules' own.

Rule (owned by the module): every module that holds parameters has
`init_value(name, shape, generator) -> Tensor`, the full initial value of its parameter `name`
(relative to that module) drawn from `generator`; the expert bank's gives ONE expert's slice.
This file uses the nearest module on a parameter's path that has one (a router owns its gate).

Key (owned here): a parameter draws from a CPU generator seeded by
`mix_seed(seed, *scope, crc32(name))`, `name` relative to its scope: the innermost module on its
path with an `init_scope` (an MoE layer: its layer id), else the root. Each expert draws from its
own generator, `(..., global expert id)`. So a value depends on (seed, layer, name, expert) only,
never on the order of a global RNG stream or on the layout, and an MoE layer built alone equals
the same layer inside a model.

Slice (owned here): one full tensor (one parameter, or one expert's slice) is drawn at a time and
this rank's shard of it is copied in, so the model is the same on 1 process and on any
ep x dp x fsdp layout and no rank holds more than one parameter (one expert) in full.

Buffers: a module whose buffers are computed (RoPE's cos/sin tables) has `reset_buffers()`;
materialize calls it after `to_empty`, so no table keeps the garbage of uninitialised memory.

build on meta -> parallelize, which calls `materialize(model, device, seed)` at the right point
(before replicating when replicated; after sharding with FSDP: only the local shards):
    with torch.device("meta"): model = MoETransformer(cfg, router, seed=seed, shard=shard)
    sync = parallelize(model, dims, groups, cfg, materialize=lambda m: materialize(m, device, seed))
A model (or layer) built on a real device takes the same path by itself (`deferred_init`), so
every parameter is drawn exactly once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from .ops.hashing import mix_seed
from .parallel.placement import is_expert_param, keeping_expert_marks

M = TypeVar("M", bound=nn.Module)


@runtime_checkable
class InitRule(Protocol):
    """A module that owns the initial values of its parameters (see the module docstring)."""

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor: ...


@runtime_checkable
class BufferRule(Protocol):
    """A module whose buffers are computed, not learned (RoPE's tables): `reset_buffers()`
    recomputes them in place. materialize calls it after `to_empty` (which leaves garbage)."""

    def reset_buffers(self) -> None: ...


@runtime_checkable
class ExpertInitRule(InitRule, Protocol):
    """The owner of stacked expert parameters [E_local, ...]: init_value gives one expert's slice;
    local slice i is global expert first_expert + i."""

    first_expert: int


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _path(model: nn.Module, fqn: str) -> list[tuple[nn.Module, str]]:
    """(module, the parameter's name inside it) for every module on the path of parameter `fqn`,
    innermost (the module that registers it) first, the root last."""
    parts = fqn.split(".")
    return [
        (model.get_submodule(".".join(parts[:i])), ".".join(parts[i:]))
        for i in range(len(parts) - 1, -1, -1)
    ]


def parameter_key(model: nn.Module, fqn: str) -> tuple[int, ...]:
    """The parts (after the seed) that key parameter `fqn`'s generator: the innermost
    `init_scope` on its path and the name inside that scope (see the module docstring)."""
    for module, name in _path(model, fqn):
        scope = getattr(module, "init_scope", None)
        if scope is not None:
            return (*scope, _name_key(name))
    return (_name_key(fqn),)


def rule_owner(model: nn.Module, fqn: str) -> tuple[InitRule, str]:
    """The nearest module on parameter `fqn`'s path with an `init_value` rule, and the name it
    knows the parameter by."""
    for module, name in _path(model, fqn):
        if isinstance(module, InitRule):
            return module, name
    raise TypeError(
        f"parameter {fqn!r}: no module on its path has an init_value(name, shape, generator) "
        f"rule; give {type(model.get_submodule(fqn.rpartition('.')[0])).__name__} (or a module "
        "above it) one, so moe_train.init knows its initial value"
    )


def _draw(owner: InitRule, name: str, shape: torch.Size, key: tuple[int, ...]) -> Tensor:
    """owner's rule for `name`, drawn on the CPU from the generator of `key`."""
    with torch.device("cpu"):
        value = owner.init_value(name, shape, _generator(*key))
    if value.shape != shape:
        raise ValueError(
            f"{type(owner).__name__}.init_value({name!r}) returned shape {tuple(value.shape)}, "
            f"expected {tuple(shape)}"
        )
    return value


def _local_slice(full: Tensor, param: Tensor) -> Tensor:
    """This rank's part of `full` for `param` (a DTensor on a 1-D mesh, Shard(d) or Replicate,
    torch.chunk semantics as FSDP2 uses; a plain tensor takes all of it)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return full
    out = full
    mesh, placements = param.device_mesh, param.placements
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            chunks = out.chunk(mesh.size(dim), placement.dim)
            coord = mesh.get_local_rank(dim)
            if coord < len(chunks):
                out = chunks[coord]
            else:
                shape = list(out.shape)
                shape[placement.dim] = 0
                out = out.new_empty(shape)
    return out


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill every parameter (its local shard) with its layout-invariant initial value: each one
    (each expert's slice) drawn once, by its module's rule, from its own generator."""
    for fqn, p in model.named_parameters(remove_duplicate=True):
        target = p.to_local() if hasattr(p, "to_local") else p
        owner, name = rule_owner(model, fqn)
        key = (seed, *parameter_key(model, fqn))
        if is_expert_param(p):  # [E_local, ...]: one draw per global expert
            if not isinstance(owner, ExpertInitRule):
                raise TypeError(
                    f"expert parameter {fqn!r}: its rule's owner {type(owner).__name__} has no "
                    "first_expert (the global id of its local expert 0); give it one"
                )
            for i in range(p.shape[0]):
                full = _draw(owner, name, p.shape[1:], (*key, owner.first_expert + i))
                target[i].copy_(_local_slice(full.unsqueeze(0), p)[0])
        else:
            target.copy_(_local_slice(_draw(owner, name, p.shape, key), p))


def materialize(model: M, device: torch.device, seed: int) -> M:
    """Allocate a model built on `meta` (sharded or not) on `device` and initialise it. Tied
    parameters stay tied (`to_empty` alone would give each module its own new tensor)."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}  # id(param) -> the modules that hold it
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((module, name))
    with keeping_expert_marks(model):
        model.to_empty(device=device)
    for (first, first_name), *others in users.values():
        for module, name in others:
            setattr(module, name, getattr(first, first_name))
    init_parameters(model, seed)
    init_buffers(model)
    return model


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Recompute every computed buffer (each module with a BufferRule) in place."""
    for module in model.modules():
        if isinstance(module, BufferRule):
            module.reset_buffers()


@contextmanager
def deferred_init(module: nn.Module, seed: int) -> Iterator[None]:
    """Inside a module's __init__: the parameters built in this block go on `meta` (no module's
    own init runs on real memory); on leaving it, unless the caller builds on meta too (a layer
    inside a model: the outermost one initialises), `materialize` them on the caller's device.
    So a module built on a real device draws each parameter exactly once, like the trainer's
    build -> parallelize -> materialize."""
    # the caller's device: a factory's (torch 2.7's get_default_device ignores `with torch.device`)
    device = torch.empty(0).device
    with torch.device("meta"):
        yield
    if device.type != "meta":
        materialize(module, device, seed)
