"""build -> parallelize -> train: apply a layout to a model built from configs alone.

`parallelize(model, dims, groups, cfg)` runs ordered steps, each a small function:
1. `connect_process_groups`: every module that needs process groups (the MoE layers' dispatchers)
   receives them; a layer never creates or looks up a group itself.
2. `replicate`: replicas start identical (dense parameters and buffers from rank 0, experts from
   dp-rank 0 of their dp group).
3. `apply_activation_checkpointing` (trainer.activation_checkpointing, non-reentrant).
4. either `shard_model` (parallel.fsdp: FSDP2 over dense and expert parameters, see fsdp.py) or
   `wrap_data_parallel`: dense gradients all-reduced by DDP while backward runs
   (parallel.overlap_grad_sync), experts ignored (see grads.sync_gradients).

This module reads no model code: modules opt in through the `UsesProcessGroups` protocol.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ParallelConfig
from .dims import ParallelDims
from .errors import guarded
from .fsdp import shard_model
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
) -> nn.Module:
    """Apply the layout to `model` (built with shard=dims.expert_shard); returns the module to
    train: the DDP wrapper when dense gradients are reduced during backward, else `model` (sharded
    in place with parallel.fsdp). A model on `meta` stays there (materialise it afterwards: see
    moe_train.init); it is never replicated. param_dtype: FSDP's compute dtype (None = as stored).
    Collective when distributed: every rank calls it, in the same order."""
    connect_process_groups(model, dims, groups)
    apply_activation_checkpointing(model, activation_checkpointing)
    if not dims.distributed:
        return model
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        replicate(model, dims, groups)
    if cfg.fsdp:
        return shard_model(
            model,
            dims,
            groups,
            device_type=device_type,
            reshard_after_forward=cfg.reshard_after_forward,
            param_dtype=param_dtype,
        )
    if cfg.overlap_grad_sync and groups.dense is not None:
        if on_meta:
            raise ValueError("parallelize: DDP needs materialised parameters, not meta ones")
        return wrap_data_parallel(model, groups.dense)
    return model


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DDP) else model
