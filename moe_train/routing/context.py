"""What one router call routes with besides the logits: passed to `Router.route`, never stored."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.hashing import counter_uniform, mix_seed


@dataclass(frozen=True)
class RouteContext:
    """num_tokens: T rows of this call; group_size: tokens per routing group (divides T);
    noise_seed and token_offset key the layout-invariant noise: row t is global token
    `token_offset + t` (see ops/hashing.py)."""

    num_tokens: int
    group_size: int
    noise_seed: int
    token_offset: int

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.group_size

    def uniform(self, stream: int, index: Tensor) -> Tensor:
        """U[0,1) float32 per entry of `index` (int64 global ids), keyed by (noise_seed, stream)."""
        return counter_uniform(mix_seed(self.noise_seed, stream), index)
