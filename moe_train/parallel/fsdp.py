"""FSDP2 (`fully_shard`) composed with expert parallelism.

Who shards what:
- dense parameters (attention, norms, dense FFNs, routers, embeddings, head) are sharded over the
  whole world on a 1-D mesh built on `groups.dense` (a world group of their own);
- expert parameters (stacked [E_local, d, h]) are sharded over the expert-data-parallel group
  `groups.dp` (the ranks holding the same experts) along dim 1, so each local expert's slice
  `w[i]` is itself a dim-0 shard (checkpoints keep one key per global expert without copies).
Neither group is the ep group, so FSDP's all-gathers and reduce-scatters never interleave with
the dispatcher's all-to-alls on one process group (gloo matches collectives by order).

Units, bottom-up as torchtitan does: each MoE layer's expert bank (edp mesh), each router in
fp32 when computing in low precision, each block (world mesh, experts already managed are
skipped), then the root (embeddings, final norm, head).

Gradient scaling (the same math as grads.py's replicated path): FSDP averages over its mesh, so
dense gradients come out as SUM over world / world; expert gradients as SUM over edp / edp, and
`finish_gradients` multiplies them by 1 / ep to give SUM over edp / world. Where FSDP sums
instead of averaging (torch 2.7's gloo reduce-scatter treats ReduceOp.AVG as SUM, so FSDP2's fp32
gradients come out mesh-size times too large on CPU), a probe at `shard_model` finds it (its
`GradDivisors`) and `finish_gradients` divides by the mesh size as well. The gradient strategy
that calls these is `grad_sync.FSDPSync`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .dims import ParallelDims
from .groups import ProcessGroups
from .placement import expert_banks, is_expert_param, keeping_expert_marks


def _fsdp_api():
    """fully_shard, MixedPrecisionPolicy (public in torch.distributed.fsdp >= 2.6)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return fully_shard, MixedPrecisionPolicy


def _mesh(group, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


def _expert_placement(p: nn.Parameter):
    """Stacked expert weights [E_local, ...] shard on dim 1 (each expert's slice on dim 0)."""
    from torch.distributed.tensor import Shard

    return Shard(1) if p.dim() >= 2 else Shard(0)


def _routers(model: nn.Module) -> Iterator[nn.Module]:
    for name, module in model.named_modules():
        if name.endswith(".router") and any(True for _ in module.parameters()):
            yield module


@dataclass(frozen=True)
class GradDivisors:
    """What FSDP's reduce-scatter leaves to divide: 1 where it averages, the mesh size where it
    sums (see the module docstring). dense: over the world mesh; expert: over the edp mesh."""

    dense: int = 1
    expert: int = 1


def shard_model(
    model: nn.Module,
    dims: ParallelDims,
    groups: ProcessGroups,
    *,
    device_type: str,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
) -> GradDivisors:
    """fully_shard the expert banks (edp mesh), routers (fp32 when param_dtype is set), blocks and
    root (world mesh), in place. Parameters become DTensors; the expert mark is carried over.
    Returns the divisors `finish_gradients` applies. Collective."""
    _, MixedPrecisionPolicy = _fsdp_api()
    if groups.dense is None or groups.dp is None:
        raise ValueError(
            "parallel.fsdp: the dense and dp groups are missing (build_process_groups)"
        )
    world_mesh = _mesh(groups.dense, device_type)
    edp_mesh = _mesh(groups.dp, device_type)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    common = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp}
    with keeping_expert_marks(model):
        _shard_units(model, world_mesh, edp_mesh, common, param_dtype)
    return GradDivisors(
        dense=_reduce_scatter_divisor(world_mesh, device_type),
        expert=_reduce_scatter_divisor(edp_mesh, device_type),
    )


def _reduce_scatter_divisor(mesh, device_type: str) -> int:
    """1 when FSDP averages gradients over `mesh` as documented, mesh.size() when it sums them
    (torch 2.7 on gloo). Probed with FSDP itself on a one-column weight: each rank's gradient is
    rank + 1, whose mean is (size + 1) / 2. Collective over `mesh`."""
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    size, rank = mesh.size(), mesh.get_local_rank()
    if size == 1:
        return 1
    device = torch.device(device_type)
    probe = nn.Linear(1, size, bias=False, device=device)  # weight [size, 1]: a row per rank
    fully_shard(probe, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    probe(torch.full((1, 1), float(rank + 1), device=device)).sum().backward()
    grad = probe.weight.grad
    assert grad is not None  # the backward above made it
    got = float(local(grad).sum())  # this rank's row
    return round(got / ((size + 1) / 2))


def _shard_units(model, world_mesh, edp_mesh, common: dict, param_dtype) -> None:
    """Bottom-up: expert banks, routers (low precision only), blocks, root."""
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    for bank in expert_banks(model):
        fully_shard(bank, mesh=edp_mesh, shard_placement_fn=_expert_placement, **common)
    if param_dtype is not None:  # router math stays fp32: its own unit, fp32 all-gather
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for router in _routers(model):
            # kept gathered until backward (d x E, small): a router returns an Assignment, whose
            # tensors FSDP's pre-backward hook does not find to gather them again
            fully_shard(router, mesh=world_mesh, reshard_after_forward=False, mp_policy=fp32)
    blocks = getattr(model, "blocks", None)
    for block in blocks if blocks is not None else []:
        fully_shard(block, mesh=world_mesh, **common)
    fully_shard(model, mesh=world_mesh, **common)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter in this backward (the last micro-batch) or accumulate unsharded (others)."""
    model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def finish_gradients(model: nn.Module, dims: ParallelDims, divisors: GradDivisors) -> None:
    """Expert gradients came out of FSDP as SUM over edp / edp: times 1/ep -> SUM over edp / world.
    Where FSDP summed instead of averaging (see the module docstring), divide by the mesh too."""
    dense_div, expert_div = divisors.dense, divisors.expert
    dense: list[Tensor] = []
    expert: list[Tensor] = []
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_expert_param(p) else dense).append(local(p.grad))
    if expert and dims.ep * expert_div != 1:
        torch._foreach_mul_(expert, 1.0 / (dims.ep * expert_div))
    if dense and dense_div != 1:
        torch._foreach_mul_(dense, 1.0 / dense_div)
