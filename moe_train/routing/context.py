"""What one router call routes with besides the logits.

`RouteKey` is the one value that keys a forward call's router noise: the caller that builds the
batch (the train step) makes it, the model passes it down unchanged, and each MoE layer mixes in
its layer id once (`RouteKey.for_layer`). `RouteContext` is what `Router.route` gets; never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.hashing import counter_uniform, mix_seed


@dataclass(frozen=True)
class RouteKey:
    """seed: the call's noise seed (the train step's: a function of (seed, step), the same on
    every rank); token_offset: the global index of the call's first token, so row t is global
    token `token_offset + t` and the same token draws the same noise on any layout."""

    seed: int
    token_offset: int = 0

    def for_layer(self, layer_id: int) -> RouteKey:
        """This key as MoE layer `layer_id` uses it (every layer draws its own noise)."""
        return RouteKey(mix_seed(self.seed, layer_id), self.token_offset)


@dataclass(frozen=True)
class RouteContext:
    """num_tokens: T rows of this call; group_size: tokens per routing group (divides T);
    key: the layer's RouteKey (the noise of row t is keyed by global token key.token_offset + t,
    see ops/hashing.py)."""

    num_tokens: int
    group_size: int
    key: RouteKey

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.group_size

    @property
    def token_offset(self) -> int:
        """Global index of row 0."""
        return self.key.token_offset

    def uniform(self, stream: int, index: Tensor) -> Tensor:
        """U[0,1) float32 per entry of `index` (int64 global ids), keyed by (key.seed, stream)."""
        return counter_uniform(mix_seed(self.key.seed, stream), index)
