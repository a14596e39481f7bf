"""Every process group of a layout, created in one place with parallel.timeout_s, and teardown."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .dims import ParallelDims


@dataclass(frozen=True)
class ProcessGroups:
    """The groups one rank takes part in. All None with one process.

    ep: my expert-parallel group (the all-to-all); dp: the ranks holding my experts (expert
    gradients); dense: a world group of DDP's own, so its bucketed all-reduces never interleave
    with the all-to-alls; intra_node / inter_node: the hierarchical all-to-all's two hops;
    mesh: the 2-D ("dp", "ep") DeviceMesh over ep and dp (for FSDP and DTensor);
    checkpoint: a gloo world group for checkpoints written in the background (async_save's
    collectives run in another thread and must not share a group with training's).
    """

    ep: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    dense: dist.ProcessGroup | None = None
    intra_node: dist.ProcessGroup | None = None
    inter_node: dist.ProcessGroup | None = None
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    checkpoint: dist.ProcessGroup | None = None


def _mine(
    rank_lists: list[list[int]], rank: int, backend: str, timeout: timedelta
) -> dist.ProcessGroup | None:
    """Create one group per rank list (every rank creates all of them, in order); return mine."""
    found = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            found = group
    return found


def build_process_groups(
    dims: ParallelDims, *, backend: str, timeout_s: float, device_type: str, dense: bool = True
) -> ProcessGroups:
    """Create the groups of `dims` on the initialised default group (collective: every rank calls
    it with the same dims but its own rank). dense: also a world group for DDP."""
    if not dims.distributed:
        return ProcessGroups()
    timeout = timedelta(seconds=timeout_s)
    ep = _mine(dims.ep_groups(), dims.rank, backend, timeout)
    dp = _mine(dims.dp_groups(), dims.rank, backend, timeout)
    assert ep is not None and dp is not None  # every rank is in one ep group and one dp group
    intra, inter = dims.node_groups()
    return ProcessGroups(
        ep=ep,
        dp=dp,
        dense=dist.new_group(backend=backend, timeout=timeout) if dense else None,
        intra_node=_mine(intra, dims.rank, backend, timeout),
        inter_node=_mine(inter, dims.rank, backend, timeout),
        mesh=dims.build_mesh(device_type, dp, ep),
        checkpoint=dist.new_group(backend="gloo", timeout=timeout),
    )


def teardown_process_group() -> None:
    """gc, barrier, destroy the default process group: the order that avoids gloo's abort at exit
    (drop your references to modules and groups first)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
