"""The running process's parallel context: layout, groups, device, and the few collectives the
training loop calls. `init_parallel` reads torchrun's environment and creates it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..routing import RouterConfig
from .config import ParallelConfig
from .dims import ParallelDims
from .errors import guarded
from .groups import ProcessGroups, build_process_groups, teardown_process_group
from .parallelize import needs_dense_group


@dataclass
class ParallelState:
    """Where this process sits (`dims`: rank, world, ep x dp, is_main), the groups it uses
    (`groups`: ep, dp, dense, mesh, ...) and its device. Read them there: `state.dims.rank`,
    `state.groups.ep`. With one process every group is None and every collective is a no-op.
    The gradient strategy is not here: `parallelize` returns it (parallel/grad_sync.py).
    """

    cfg: ParallelConfig
    dims: ParallelDims = field(default_factory=ParallelDims)
    groups: ProcessGroups = field(default_factory=ProcessGroups)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Mean of `t` over all ranks (a new tensor; `t` is untouched)."""
        if not self.dims.distributed:
            return t.detach().clone()
        out = t.detach().clone().float() if not t.is_floating_point() else t.detach().clone()
        guarded("all_reduce(mean)", lambda: dist.all_reduce(out))
        return out / self.dims.world_size

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """Max of `t` over all ranks (a new tensor)."""
        out = t.detach().clone()
        if self.dims.distributed:
            guarded("all_reduce(max)", lambda: dist.all_reduce(out, op=dist.ReduceOp.MAX))
        return out

    def barrier(self) -> None:
        if self.dims.distributed:
            guarded("barrier", lambda: dist.barrier())

    def shutdown(self) -> None:
        """Clean teardown: drop the groups, gc, barrier, destroy the process group."""
        self.groups = ProcessGroups()
        teardown_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _device_and_backend(backend: str, local_rank: int) -> tuple[torch.device, str]:
    """nccl on cuda:LOCAL_RANK, gloo on the CPU (parallel.backend=auto), or as asked."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return device, backend


def init_parallel(cfg: ParallelConfig, num_experts: int, router: RouterConfig) -> ParallelState:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), check the
    layout, initialise the default process group with parallel.timeout_s (unless already done:
    then its world is used) and create every group of the layout. No env: one process, no group."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate(world, num_experts, router)
    device, backend = _device_and_backend(cfg.backend, local_rank)
    dims = ParallelDims.from_config(cfg, world, rank, _env_int("LOCAL_WORLD_SIZE", world))
    state = ParallelState(cfg, dims, device=device)
    if world == 1:
        return state
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world, **kwargs)
    state.groups = build_process_groups(
        dims,
        backend=backend,
        timeout_s=cfg.timeout_s,
        device_type=device.type,
        dense=needs_dense_group(cfg),
    )
    return state
