"""The parallel layout as a value: degrees, ranks and the rank lists of every group.

Pure arithmetic (no torch.distributed call except in `build_mesh`), so any rank's layout can be
computed and tested anywhere, and the planner and the trainer agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .placement import ExpertShard

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from .config import ParallelConfig

MESH_DIMS = ("dp", "ep")


@dataclass(frozen=True)
class ParallelDims:
    """World = dp x ep; global rank = dp_rank * ep + ep_rank, so an expert-parallel group is `ep`
    consecutive ranks and a dp group holds the ranks with the same ep_rank.

    ranks_per_node: ranks per node (None = the whole world is one node); it places the
        hierarchical all-to-all's node groups and counts inter-node bytes.
    hierarchical_a2a: two-hop all-to-all when each ep group covers several whole nodes.
    """

    world_size: int = 1
    ep: int = 1
    rank: int = 0
    ranks_per_node: int | None = None
    hierarchical_a2a: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.ep < 1:
            raise ValueError(f"world_size={self.world_size} and parallel.ep={self.ep} must be >= 1")
        if self.world_size % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} does not divide the world size {self.world_size} "
                f"(world = ep * dp); launch a multiple of {self.ep} processes or change parallel.ep"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside [0, world_size={self.world_size})")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(
                f"parallel.ranks_per_node: must be >= 1 or null, got {self.ranks_per_node}"
            )

    @classmethod
    def from_config(
        cls, cfg: ParallelConfig, world_size: int, rank: int, local_world_size: int | None = None
    ) -> ParallelDims:
        """parallel.ranks_per_node, else torchrun's LOCAL_WORLD_SIZE, else the whole world."""
        return cls(
            world_size=world_size,
            ep=cfg.ep,
            rank=rank,
            ranks_per_node=cfg.ranks_per_node or local_world_size or world_size,
            hierarchical_a2a=cfg.hierarchical_a2a,
        )

    # ---- degrees and my coordinates ---------------------------------------------------------
    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or self.world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def expert_shard(self) -> ExpertShard:
        """The experts this rank holds (pass to MoETransformer / MoELayer)."""
        return ExpertShard(self.ep, self.ep_rank)

    @property
    def hierarchical(self) -> bool:
        """Node groups are used: asked for, and each ep group spans several whole nodes."""
        rpn = self.node_size
        return self.hierarchical_a2a and self.ep > rpn and self.ep % rpn == 0

    # ---- rank lists (every rank creates every group, in this order) -------------------------
    def mesh_layout(self) -> list[list[int]]:
        """[dp][ep] global ranks: row d is dp-rank d's expert-parallel group."""
        return [[d * self.ep + e for e in range(self.ep)] for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        return self.mesh_layout()

    def dp_groups(self) -> list[list[int]]:
        """Column e: the ranks holding the same experts (ep-rank e in every dp replica)."""
        return [list(col) for col in zip(*self.mesh_layout())]

    def node_groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """(intra, inter) inside every ep group: intra = one node's ep ranks (by local index),
        inter = the ep ranks with the same local index (by node). Empty when not hierarchical."""
        if not self.hierarchical:
            return [], []
        rpn, nodes = self.node_size, self.ep // self.node_size
        intra, inter = [], []
        for row in self.mesh_layout():
            intra += [row[n * rpn : (n + 1) * rpn] for n in range(nodes)]
            inter += [row[local::rpn] for local in range(rpn)]
        return intra, inter

    def build_mesh(
        self, device_type: str, dp_group: dist.ProcessGroup, ep_group: dist.ProcessGroup
    ) -> DeviceMesh:
        """The 2-D ("dp", "ep") DeviceMesh over groups already created (so they keep their own
        backend and timeout: init_device_mesh's backend_override does not exist in torch 2.7)."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        layout = torch.tensor(self.mesh_layout(), dtype=torch.int)
        return DeviceMesh.from_group(
            [dp_group, ep_group], device_type, mesh=layout, mesh_dim_names=MESH_DIMS
        )
