"""The model's parameters and optimizer state as checkpoint keys, experts along the global axis.

Dense parameters/buffers as `model/<fqn>`; expert parameters (`is_expert_param`, stacked
[E_local, ...], this rank's share given by the layer's ExpertShard) as one key per GLOBAL expert,
`model/<fqn>/expert_<id>`, and so is their stacked optimizer state
(`optim/<fqn>/<name>/expert_<id>`). The values are the live tensors or views of them (FSDP
DTensor shards, per-expert DTensor views): nothing is cloned to save, nothing allocated twice to
load. Each rank writes only what it holds and DCP de-duplicates replicated keys, so a checkpoint
taken in any layout (ep, dp, parallel.fsdp on or off) loads in any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import MoELayer
from ..parallel import is_expert_param
from .errors import CheckpointError


def _expert_info(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """fqn of every expert parameter -> (first global expert, local experts, global experts)."""
    info: dict[str, tuple[int, int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoELayer):
            shard, E = mod.shard, mod.num_experts
            where = (shard.first_expert(E), shard.num_local(E), E)
            prefix = f"{name}.experts." if name else "experts."
            for pname, p in mod.experts.named_parameters(recurse=False):
                if is_expert_param(p):
                    info[prefix + pname] = where
    return info


def param_table(
    model: nn.Module,
) -> tuple[dict[str, nn.Parameter], dict[str, tuple[int, int, int]]]:
    params = dict(model.named_parameters(remove_duplicate=True))
    info = _expert_info(model)
    for fqn, p in params.items():
        if is_expert_param(p) and fqn not in info:
            raise CheckpointError(f"expert parameter {fqn} is not inside a MoELayer")
    return params, info


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k not in params}


def _expert_keys(prefix: str, first: int, num_local: int) -> list[tuple[int, str]]:
    return [(i, f"{prefix}/expert_{first + i:05d}") for i in range(num_local)]


def shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    params, info = param_table(model)
    out: dict[str, dict[str, Any]] = {}
    for fqn, p in params.items():
        if fqn in info:
            out[fqn] = {"expert": True, "num_experts": info[fqn][2], "shape": list(p.shape[1:])}
        else:
            out[fqn] = {"expert": False, "shape": list(p.shape)}
    for name, b in _buffers(model).items():
        out[name] = {"expert": False, "shape": list(b.shape), "buffer": True}
    return out


def optim_slots(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]):
    """(fqn, param, group index) for every parameter the optimizer holds, in its order."""
    names = {id(p): n for n, p in params.items()}
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter the model does not name")
            out.append((names[id(p)], p, gi))
    return out


def _expert_slice(t: Tensor, i: int) -> Tensor:
    """Local expert i of a stacked tensor [E_local, ...] as a view: a plain slice, or for a
    DTensor (FSDP shards experts along dim 1) a DTensor over the same mesh whose shard dims are
    one lower, so the slice of every global expert is itself a sharded tensor that DCP reshards."""
    from torch.distributed.tensor import DTensor, Placement, Shard

    if not isinstance(t, DTensor):
        return t.detach()[i]
    placements: list[Placement] = []
    for pl in t.placements:
        if isinstance(pl, Shard) and pl.dim == 0:
            raise CheckpointError("an expert tensor sharded along its expert dim (0)")
        placements.append(Shard(pl.dim - 1) if isinstance(pl, Shard) else pl)
    shape = t.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    local = t.to_local().detach()[i]
    return DTensor.from_local(
        local, t.device_mesh, placements, run_check=False, shape=shape, stride=stride
    )


def _is_per_expert(v: Tensor, p: Tensor) -> bool:
    """An expert parameter's optimizer state that is stacked like it ([E_local, ...]: Adam's
    moments, Adafactor's row/column statistics), as opposed to a scalar (the step)."""
    return v.dim() == p.dim() and v.shape[0] == p.shape[0]


def _model_tensors(
    model: nn.Module, params: Mapping[str, Tensor], info: dict[str, tuple[int, int, int]]
) -> dict[str, Tensor]:
    """Checkpoint key -> live tensor (or a view of it) for every parameter and buffer; stacked
    expert weights as one view per GLOBAL expert id. Nothing is copied."""
    out: dict[str, Tensor] = {}
    for fqn, p in params.items():
        if fqn in info:
            first, n, _ = info[fqn]
            out.update(
                {key: _expert_slice(p, i) for i, key in _expert_keys(f"model/{fqn}", first, n)}
            )
        else:
            out[f"model/{fqn}"] = p.detach()
    out.update({f"model/{name}": b.detach() for name, b in _buffers(model).items()})
    return out


def _optim_tensors(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor],
    info: dict[str, tuple[int, int, int]],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(checkpoint key -> live optimizer state tensor or view, the optimizer's meta: parameter
    groups' hyperparameters and every state entry's kind). Expert state per global expert."""
    sd: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"param_groups": [], "state": {}}
    slots = optim_slots(optimizer, params)
    for gi, group in enumerate(optimizer.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper["params"] = [f for f, _, g in slots if g == gi]
        meta["param_groups"].append(hyper)
    for fqn, p, _ in slots:
        entries: dict[str, Any] = {}
        for name, v in optimizer.state.get(p, {}).items():
            if isinstance(v, Tensor) and fqn in info and _is_per_expert(v, p):
                first, n, _ = info[fqn]
                for i, key in _expert_keys(f"optim/{fqn}/{name}", first, n):
                    sd[key] = _expert_slice(v, i)
                entries[name] = {"kind": "expert", "dtype": str(v.dtype)}
            elif isinstance(v, Tensor):
                sd[f"optim/{fqn}/{name}"] = v.detach()
                entries[name] = {"kind": "tensor", "shape": list(v.shape), "dtype": str(v.dtype)}
            else:
                entries[name] = {"kind": "value", "value": v}
        meta["state"][fqn] = entries
    return sd, meta


def state_views(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """(DCP state dict of views of the live tensors, the optimizer's meta): no clone. DCP copies
    one tensor at a time to the CPU while writing (views of a larger storage included)."""
    params, info = param_table(model)
    sd = _model_tensors(model, params, info)
    optim_meta: dict[str, Any] = {"param_groups": [], "state": {}}
    if optimizer is not None:
        optim_sd, optim_meta = _optim_tensors(optimizer, params, info)
        sd.update(optim_sd)
    return sd, optim_meta
