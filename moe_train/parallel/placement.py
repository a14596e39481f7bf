"""Where experts live: a plain value (no process group) and the mark on expert parameters.

The model reads an ExpertShard to build one rank's experts; the parallel code reads the mark to
reduce expert gradients over the ranks that hold the same experts. Nothing here talks to
torch.distributed, so any rank's model can be built anywhere (the meta device included).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

_EXPERT_MARK = "is_expert"  # attribute set on expert parameters (read by grads, checkpoints)


def mark_expert(p: nn.Parameter) -> nn.Parameter:
    """Mark `p` as an expert parameter (held by one ep-rank, reduced over its dp group)."""
    setattr(p, _EXPERT_MARK, True)
    return p


def is_expert_param(p: nn.Parameter) -> bool:
    """True for parameters marked by `mark_expert` (the one test used across the package)."""
    return bool(getattr(p, _EXPERT_MARK, False))


@contextmanager
def keeping_expert_marks(model: nn.Module) -> Iterator[None]:
    """Re-mark the expert parameters after an operation that replaces parameter objects
    (`to_empty` from meta, FSDP's `fully_shard`): the mark lives on the Parameter, not its name."""
    names = [name for name, p in model.named_parameters() if is_expert_param(p)]
    yield
    for name in names:
        mark_expert(model.get_parameter(name))


def expert_banks(model: nn.Module) -> Iterator[nn.Module]:
    """Modules whose own parameters are all expert parameters (the MoE layers' expert banks)."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and all(is_expert_param(p) for p in own):
            yield module


@dataclass(frozen=True)
class ExpertShard:
    """This rank's share of every MoE layer's experts: ep-rank `ep_rank` of `ep_size` holds the
    consecutive global experts [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size).

    The default (1, 0) holds all experts locally.
    """

    ep_size: int = 1
    ep_rank: int = 0

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"parallel.ep: must be >= 1, got {self.ep_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} is outside [0, parallel.ep={self.ep_size})")

    def num_local(self, num_experts: int) -> int:
        """Experts per rank; raises ValueError when they do not split evenly."""
        if num_experts % self.ep_size:
            raise ValueError(
                f"model.num_experts={num_experts} is not divisible by parallel.ep={self.ep_size}; "
                "each rank must hold the same number of experts: choose ep among the divisors "
                "of the expert count"
            )
        return num_experts // self.ep_size

    def first_expert(self, num_experts: int) -> int:
        """Global id of this rank's first expert."""
        return self.ep_rank * self.num_local(num_experts)
