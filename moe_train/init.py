"""Layout-invariant initialisation, of whole models or only of this rank's shards.

Every parameter's initial value is a function of (seed, parameter name) and, for experts, the
GLOBAL expert id, never of the order of a global RNG stream: one full tensor (one parameter, or
one expert's slice) is drawn at a time on the CPU from its own generator and this rank's shard of
it is copied in. So the model is the same on 1 process and on any ep x dp x fsdp layout, and no
rank ever holds more than one parameter (one expert) in full.

build on meta -> parallelize, which calls `materialize(model, device, seed)` at the right point
(before replicating when replicated; after sharding with FSDP: only the local shards):
    with torch.device("meta"): model = MoETransformer(cfg, router, seed=seed, shard=shard)
    sync = parallelize(model, dims, groups, cfg, materialize=lambda m: materialize(m, device, seed))

Rules (the model's, kept from before the meta path): LayerNorm weight 1, bias 0; the routers'
gates by their router's rule (truncated normal, std sqrt(init_scale / d_model), bias 0); other
matrices and embeddings normal(0, init_std), attention/FFN output projections
init_std / sqrt(2 * n_layers); experts normal clamped to +-3 std, per global expert.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import Tensor, nn

from .experts import ExpertBank
from .ops.hashing import mix_seed
from .parallel.placement import is_expert_param, keeping_expert_marks
from .routing.base import Router

if TYPE_CHECKING:
    from .model import ModelConfig

M = TypeVar("M", bound=nn.Module)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """The module that registers parameter `fqn`, and the parameter's name inside it."""
    path, _, pname = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), pname


def _router_of(model: nn.Module, fqn: str) -> Router | None:
    parts = fqn.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        if isinstance(mod, Router):
            return mod
    return None


def dense_value(model: nn.Module, fqn: str, shape: torch.Size, seed: int) -> Tensor:
    """The full initial value of dense parameter `fqn` (fp32, CPU)."""
    owner, pname = _owner(model, fqn)
    if isinstance(owner, nn.LayerNorm) or pname == "bias":
        return torch.ones(shape) if pname == "weight" and len(shape) == 1 else torch.zeros(shape)
    g = _generator(seed, _name_key(fqn))
    router = _router_of(model, fqn)
    if router is not None:
        std = math.sqrt(router.cfg.init_scale / router.d_model)
        return nn.init.trunc_normal_(
            torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=g
        )
    cfg = cast("ModelConfig", model.cfg)
    std = cfg.init_std
    if fqn.endswith(("proj.weight", "w_out.weight")):
        std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return torch.randn(shape, generator=g) * std


def expert_value(bank: ExpertBank, pname: str, expert: int, seed: int, fqn: str) -> Tensor:
    """The initial value of global expert `expert`'s slice of stacked parameter `pname`."""
    std = bank.out_std if pname == "w_out" else bank.init_std
    shape = getattr(bank, pname).shape[1:]
    g = _generator(seed, _name_key(fqn), expert)
    return (torch.randn(shape, generator=g) * std).clamp_(-3 * std, 3 * std)


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
    """Fill every parameter (its local shard) with its layout-invariant initial value."""
    for fqn, p in model.named_parameters(remove_duplicate=True):
        target = p.to_local() if hasattr(p, "to_local") else p
        if is_expert_param(p):
            bank, pname = _owner(model, fqn)
            assert isinstance(bank, ExpertBank), fqn  # is_expert_param: an ExpertBank's own
            for i in range(p.shape[0]):
                full = expert_value(bank, pname, bank.first_expert + i, seed, fqn)
                target[i].copy_(_local_slice(full.unsqueeze(0), p)[0])
        else:
            target.copy_(_local_slice(dense_value(model, fqn, p.shape, seed), p))


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
    return model
