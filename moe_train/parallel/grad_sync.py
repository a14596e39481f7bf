"""The gradient strategy of a run, as a value: `parallelize` chooses it and returns it.

One run reduces its gradients one way, chosen once from the layout and parallel.fsdp /
parallel.overlap_grad_sync:
- `FlatSync`: replicated dense parameters, everything all-reduced after backward in flat buckets
  (also the one-process case, where every collective is skipped);
- `DDPSync`: DistributedDataParallel all-reduces the dense gradients while backward runs, and
  gradient hooks all-reduce the experts' over their dp group as each bank's backward finishes
  (grad_hooks.py), waited for in `sync()`;
- `FSDPSync`: FSDP2 reduce-scatters in backward; experts are rescaled after it (fsdp.py).

The native engine holds one and asks it, per step: `no_sync(last)` around each micro-batch,
`sync()` after the last backward, `clip(max_norm)` after unscaling. Nothing else looks at the
wrapper's type. The math is in grads.py (replicated) and fsdp.py (sharded).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .dims import ParallelDims
from .fsdp import GradDivisors, finish_gradients, set_gradient_sync
from .grad_hooks import ExpertGradReducer
from .grads import clip_replicated_, clip_sharded_, sync_all_gradients, sync_expert_gradients
from .groups import ProcessGroups


class GradSync(Protocol):
    """How this run's gradients are reduced and clipped, and which module runs and which saves."""

    @property
    def model(self) -> nn.Module:
        """What the forward pass calls (the DDP wrapper, or the model itself)."""
        ...

    @property
    def module(self) -> nn.Module:
        """The bare model: the optimizer's parameters, checkpoint keys, last_aux."""
        ...

    def no_sync(self, last: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward and backward; `last` ends the accumulation (the
        strategies that reduce in backward reduce only then)."""
        ...

    def sync(self) -> None:
        """Finish the reduction after the last micro-batch's backward: every gradient becomes the
        gradient of the mean of the per-rank losses (grads.py's docstring)."""
        ...

    def clip(self, max_norm: float) -> Tensor:
        """Global gradient norm [] (each element counted once over the world), and the gradients
        scaled by min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Call after sync()."""
        ...


class FlatSync:
    """Replicated dense parameters, all gradients all-reduced after backward (one process: none)."""

    def __init__(self, module: nn.Module, dims: ParallelDims, groups: ProcessGroups):
        self.module, self.dims, self.groups = module, dims, groups

    @property
    def model(self) -> nn.Module:
        return self.module

    def no_sync(self, last: bool) -> AbstractContextManager:
        return contextlib.nullcontext()  # nothing is reduced during backward

    def sync(self) -> None:
        sync_all_gradients(self.module, self.dims, self.groups)

    def clip(self, max_norm: float) -> Tensor:
        return clip_replicated_(self.module, max_norm, self.dims, self.groups)


class DDPSync(FlatSync):
    """Dense gradients all-reduced by `ddp` while backward runs (parallel.overlap_grad_sync); the
    experts, which DDP ignores, by the hooks of an ExpertGradReducer in the same backward (dp > 1;
    with dp = 1 nothing is reduced, `sync` only scales). Both reduce on the last micro-batch."""

    def __init__(self, ddp: DDP, module: nn.Module, dims: ParallelDims, groups: ProcessGroups):
        super().__init__(module, dims, groups)
        self.ddp = ddp
        self.experts: ExpertGradReducer | None = None
        if dims.dp > 1:
            self.experts = ExpertGradReducer(module, groups.dp, dims.world_size)

    @property
    def model(self) -> nn.Module:
        return self.ddp

    def no_sync(self, last: bool) -> AbstractContextManager:
        if self.experts is not None:
            self.experts.arm(last)
        return contextlib.nullcontext() if last else self.ddp.no_sync()  # reduce once, at the end

    def sync(self) -> None:
        if self.experts is not None:
            self.experts.finish()
        else:
            sync_expert_gradients(self.module, self.dims, self.groups)


class FSDPSync:
    """FSDP2 (parallel.fsdp): gradients accumulate unsharded until the last micro-batch, whose
    backward reduce-scatters them; `sync` rescales the experts (and divides where FSDP summed)."""

    def __init__(self, module: nn.Module, dims: ParallelDims, divisors: GradDivisors):
        self.module, self.dims, self.divisors = module, dims, divisors

    @property
    def model(self) -> nn.Module:
        return self.module

    def no_sync(self, last: bool) -> AbstractContextManager:
        set_gradient_sync(self.module, last)
        return contextlib.nullcontext()

    def sync(self) -> None:
        finish_gradients(self.module, self.dims, self.divisors)

    def clip(self, max_norm: float) -> Tensor:
        return clip_sharded_(self.module, max_norm)
