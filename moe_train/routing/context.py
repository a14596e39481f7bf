"""What one router call routes with besides the logits.

`RouteKey` is the one value that keys a forward call's router noise: the caller that builds the
batch (the train step) makes it, the model passes it down unchanged, and each MoE layer mixes in
its layer id once (`RouteKey.for_layer`). `RouteContext` is what `Router.route` gets; never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.hashing import Seed, counter_uniform, mix_seed, seed_tensor


@dataclass(frozen=True)
class RouteKey:
    """seed: the call's noise seed (the train step's: a function of (seed, step), the same on
    every rank), an int or its 0-d int64 tensor (ops.hashing.Seed); token_offset: the global
    index of the call's first token, so row t is global token `token_offset + t` and the same
    token draws the same noise on any layout (an int, or a 0-d int64 tensor in compiled blocks,
    where a constant offset would be specialised: a recompile per rank, and inductor folding
    `(offset + t) * golden` overflows int64 at compile time). layered: the layer id is already mixed in
    (`for_compiled_layer`), so the layer uses the key as it is."""

    seed: Seed
    token_offset: int | Tensor = 0
    layered: bool = False

    def for_layer(self, layer_id: int) -> RouteKey:
        """This key as MoE layer `layer_id` uses it (every layer draws its own noise)."""
        if self.layered:
            return self
        return RouteKey(mix_seed(self.seed, layer_id), self.token_offset, layered=True)

    def for_compiled_layer(self, layer_id: int, device: torch.device) -> RouteKey:
        """for_layer mixed on the host, its seed and token offset carried as tensors on `device`:
        a compiled block then sees neither the step's seed, its layer id nor the rank's token
        offset as a constant (no guard on them, so no recompile per step, layer or rank;
        moe_train/parallel/compile.py)."""
        key = self.for_layer(layer_id)
        seed = key.seed if isinstance(key.seed, Tensor) else seed_tensor(key.seed, device)
        offset = key.token_offset
        if not isinstance(offset, Tensor):
            offset = torch.tensor(offset, dtype=torch.int64, device=device)
        return RouteKey(seed, offset, layered=True)


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
    def token_offset(self) -> int | Tensor:
        """Global index of row 0."""
        return self.key.token_offset

    def uniform(self, stream: int, index: Tensor) -> Tensor:
        """U[0,1) float32 per entry of `index` (int64 global ids), keyed by (key.seed, stream)."""
        return counter_uniform(mix_seed(self.key.seed, stream), index)
