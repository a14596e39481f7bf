"""build -> parallelize -> train: apply a layout to a model built from configs alone.

`parallelize(model, dims, groups, cfg, materialize=...)` runs ordered steps, each a small function,
and returns the run's gradient strategy (a GradSync: grad_sync.py):
1. `connect_process_groups`: every module that needs process groups (the MoE layers' dispatchers)
   receives them; a layer never creates or looks up a group itself.
2. `apply_activation_checkpointing` (trainer.activation_checkpointing, non-reentrant), then
   `compile_blocks` (trainer.compile: torch.compile per block, in place; compile.py).
3. with parallel.fsdp: `shard_model` (FSDP2 over dense and expert parameters, see fsdp.py), on
   `meta` when the model is there, then `materialize` allocates and initialises only this rank's
   shards -> FSDPSync.
   Otherwise (replicated): `materialize` the whole local model, `replicate` (replicas start
   identical: dense parameters and buffers from rank 0, experts from dp-rank 0 of their dp group),
   then `wrap_data_parallel`: dense gradients all-reduced by DDP while backward runs
   (parallel.overlap_grad_sync), experts ignored -> DDPSync; or no wrapper -> FlatSync.
   One process: `materialize` -> FlatSync (every collective skipped).

This module reads no model code: modules opt in through the `UsesProcessGroups` protocol, and
initialisation comes in as the `materialize` callback (moe_train.init.materialize in the trainer).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .compile import compile_blocks
from .config import ParallelConfig
from .dims import ParallelDims
from .errors import guarded
from .fsdp import shard_model
from .grad_sync import DDPSync, FlatSync, FSDPSync, GradSync
from .grads import unique_params
from .groups import ProcessGroups
from .placement import is_expert_param
from .recompute import apply_activation_checkpointing


@runtime_checkable
class UsesProcessGroups(Protocol):
    """A module that communicates (an MoE layer): it receives its groups from `parallelize`."""

    def connect_process_groups(self, dims: ParallelDims, groups: ProcessGroups) -> None: ...


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    groups: ProcessGroups,
    cfg: ParallelConfig,
    *,
    activation_checkpointing: str = "none",
    param_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    materialize: Callable[[nn.Module], object] | None = None,
    compile: str = "none",
) -> GradSync:
    """Apply the layout to `model` (built with shard=dims.expert_shard, on `meta` or not) and
    return its gradient strategy: `.model` runs the forward pass, `.module` is `model` itself.

    materialize: allocates and initialises `model` in place (e.g. `lambda m: materialize(m,
    device, seed)`), called once the parameters' placement is final: before replication when
    replicated, after sharding with parallel.fsdp (so only the local shards are allocated). None:
    the model is used as it is (a model left on `meta` stays there, unreplicated: materialise it
    afterwards with the layout-invariant init, moe_train.init). param_dtype: FSDP's compute
    dtype (None = as stored). compile: trainer.compile ('blocks': each block torch.compile'd in
    place, after recomputation and before FSDP/DDP: compile.py). Collective when distributed:
    every rank calls it, in the same order.
    """
    connect_process_groups(model, dims, groups)
    apply_activation_checkpointing(model, activation_checkpointing)
    compile_blocks(model, compile)
    if dims.distributed and cfg.fsdp:
        if not _on_meta(model):  # sharding splits the replicas: make them identical first
            replicate(model, dims, groups)
        divisors = shard_model(
            model,
            dims,
            groups,
            device_type=device_type,
            reshard_after_forward=cfg.reshard_after_forward,
            param_dtype=param_dtype,
        )
        if materialize is not None:
            materialize(model)
        return FSDPSync(model, dims, divisors)
    if materialize is not None:
        materialize(model)
    if not dims.distributed:
        return FlatSync(model, dims, groups)
    on_meta = _on_meta(model)
    if not on_meta:
        replicate(model, dims, groups)
    if cfg.overlap_grad_sync and groups.dense is not None:
        if on_meta:
            raise ValueError(
                "parallelize: DDP needs materialised parameters, not meta ones (pass "
                "materialize=..., or set parallel.fsdp=true to shard on meta)"
            )
        return DDPSync(wrap_data_parallel(model, groups.dense), model, dims, groups)
    return FlatSync(model, dims, groups)


def needs_dense_group(cfg: ParallelConfig) -> bool:
    """Whether the strategy `parallelize` will choose reduces dense gradients during backward
    (FSDP, or DDP with parallel.overlap_grad_sync), over a world group of its own (groups.dense),
    which `init_parallel` then creates."""
    return cfg.fsdp or cfg.overlap_grad_sync


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def connect_process_groups(model: nn.Module, dims: ParallelDims, groups: ProcessGroups) -> None:
    for module in model.modules():
        if isinstance(module, UsesProcessGroups):
            module.connect_process_groups(dims, groups)


@torch.no_grad()
def replicate(model: nn.Module, dims: ParallelDims, groups: ProcessGroups) -> None:
    """Dense parameters and buffers from global rank 0; experts from dp-rank 0 of their dp group
    (the layout-invariant init already agrees; this guards against any rank-local drift)."""
    for name, p in unique_params(model):
        if not is_expert_param(p):
            guarded(f"broadcast({name})", functools.partial(dist.broadcast, p.data, src=0))
        elif dims.dp > 1:
            guarded(
                f"broadcast({name})",
                functools.partial(dist.broadcast, p.data, group=groups.dp, group_src=0),
                "the dp group",
            )
    for name, b in model.named_buffers():
        guarded(f"broadcast({name})", functools.partial(dist.broadcast, b.data, src=0))


def wrap_data_parallel(model: nn.Module, group: dist.ProcessGroup) -> DDP:
    """DDP over the dense parameters on `group` (a group of its own, so its bucketed all-reduces
    never interleave with the MoE all-to-alls); expert parameters are ignored by DDP."""
    experts = [name for name, p in unique_params(model) if is_expert_param(p)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    device = next(model.parameters()).device
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        **_no_sync_at_init(),
    )


def _no_sync_at_init() -> dict[str, Any]:
    """DDP options for replicas already made identical by `replicate`: no init broadcast, no
    buffer broadcast per forward. torch >= 2.13 spells the latter forward_sync_buffers
    (broadcast_buffers warns there); torch 2.7 only knows broadcast_buffers."""
    accepted = inspect.signature(DDP.__init__).parameters
    options = {"init_sync": False} if "init_sync" in accepted else {}
    if "forward_sync_buffers" in accepted:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return options
