"""Parallel layout configuration and its start-up checks."""

from __future__ import annotations

from dataclasses import dataclass

from ..routing import RouterConfig, router_class
from ..validation import above, at_least, check_finite, one_of
from .dims import ParallelDims
from .placement import ExpertShard

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """Expert-parallel x data-parallel layout. World = ep * dp, dp = world / ep.

    ep: expert-parallel size (ranks that split the experts of every MoE layer between them).
    timeout_s: collective timeout; a dead or missing peer raises an error after this long.
    backend: auto (nccl for cuda, gloo for cpu) | gloo | nccl.
    hierarchical_a2a: two-stage all-to-all for multi-node runs: a token crosses the inter-node link
        once per destination node, then fans out inside the node (the return trip reduces inside
        the node first, then crosses once).
    fsdp: shard parameters, gradients and optimizer state with FSDP2 (`fully_shard`): dense over
        all ranks, experts over the ranks holding the same experts (moe_train.parallel.fsdp).
        False: dense replicated on every rank, experts on their ep-rank (DDP / flat all-reduce).
    reshard_after_forward: with fsdp, free the gathered parameters after each unit's forward and
        gather them again in backward (ZeRO-3 memory); False keeps them until backward (ZeRO-2:
        one all-gather per step fewer, the unsharded low-precision weights stay in memory).
    ranks_per_node: ranks per node for the hierarchical all-to-all; None = LOCAL_WORLD_SIZE from
        torchrun, or the whole world.
    overlap_grad_sync: reduce gradients during the backward pass: dense ones by
        DistributedDataParallel (experts ignored), expert ones over their dp group by gradient
        hooks as each expert bank's backward finishes (async, bucketed; waited for at the step).
        False: everything is reduced after backward in flat buckets. FSDP overlaps on its own.
    """

    ep: int = 1
    timeout_s: float = 300.0
    backend: str = "auto"
    hierarchical_a2a: bool = False
    ranks_per_node: int | None = None
    overlap_grad_sync: bool = True  # dense (DDP) and expert (hooks) grads reduced in backward
    fsdp: bool = False
    reshard_after_forward: bool = True

    def validate(self, world_size: int, num_experts: int, router: RouterConfig) -> None:
        """Raise ValueError naming the fields when the layout cannot be built.

        SAM: every rank must hold whole device groups (router.num_groups a multiple of
        parallel.ep, e.g. equal) so that each token has exactly ONE destination rank; with ep a
        multiple of num_groups a group would straddle ranks and a token would cross the network
        up to k times, which defeats SAM, so that layout is refused.
        """
        check_finite(self, "parallel")
        one_of(self, "parallel", "backend", BACKENDS)
        above(self, "parallel", 0, "timeout_s")
        at_least(self, "parallel", 1, "ep")
        at_least(self, "parallel", 1, "ranks_per_node", optional=True)
        ParallelDims(world_size=world_size, ep=self.ep)  # parallel.ep divides the world
        ExpertShard(self.ep).num_local(num_experts)  # and the experts of every MoE layer
        router_class(router.kind).check_layout(router, self.ep)
        rpn = self.ranks_per_node
        if self.hierarchical_a2a and rpn is not None and world_size > 1:
            if world_size % rpn:
                raise ValueError(
                    f"parallel.ranks_per_node={rpn} does not divide the world size {world_size}"
                )
            if self.ep % rpn and rpn % self.ep:
                raise ValueError(
                    f"parallel.hierarchical_a2a: parallel.ep={self.ep} and "
                    f"parallel.ranks_per_node={rpn} must divide one another so that each "
                    "expert-parallel group covers whole nodes (or sits inside one node)"
                )
