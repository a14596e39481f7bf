"""The one output type of every router."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.indexing import count_values


@dataclass
class Assignment:
    """Which tokens go to which experts, with what weight.

    Only kept slots are listed (slots dropped by capacity are gone), in no particular order.
    token:  [S] int64, index of the token in the router's input
    expert: [S] int64, global expert id
    weight: [S] float32, combine weight (differentiable w.r.t. the router)
    losses: named scalar aux losses, already scaled by their coefficients
    expert_load: [E] int64, slots kept per expert
    dropped: 0-dim int64, slots dropped by capacity (or by the per-token cap of expert choice)
    requested: slots the router asked for before capacity (T*k for token choice)
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    expert_load: Tensor | None = None
    dropped: Tensor | None = None
    requested: int = 0

    def __post_init__(self) -> None:
        if self.expert_load is None:
            self.expert_load = count_values(self.expert, self.num_experts)
        if self.dropped is None:
            self.dropped = torch.zeros((), dtype=torch.int64, device=self.token.device)

    @classmethod
    def from_slots(
        cls,
        token: Tensor,
        expert: Tensor,
        weight: Tensor,
        keep: Tensor | None,
        num_tokens: int,
        num_experts: int,
        losses: dict[str, Tensor],
    ) -> Assignment:
        """The kept slots of the requested ones (token, expert, weight: [S]; keep: [S] bool, or
        None when every slot is kept: no compaction, so no host sync on a GPU)."""
        if keep is None:
            return cls(token, expert, weight, num_tokens, num_experts, losses,
                       requested=int(token.numel()))  # fmt: skip
        kept = keep.nonzero().squeeze(1)  # [S_kept]: the one host sync (a data-dependent size)
        return cls(
            token[kept],
            expert[kept],
            weight[kept],
            num_tokens,
            num_experts,
            losses,
            dropped=(~keep).sum(),
            requested=int(token.numel()),
        )

    @property
    def num_slots(self) -> int:
        return int(self.token.numel())
