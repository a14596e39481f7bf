"""Expert gradients reduced while backward runs: DDP's buckets, for the parameters DDP ignores.

Each expert parameter gets a post-accumulate-grad hook. On the micro-batch that ends the
accumulation (`arm`), the hook marks its parameter ready; a bucket whose parameters are all ready
is flattened and all-reduced (SUM) over the expert-data-parallel group asynchronously, so the
reduction of the last layer's experts overlaps the backward of the layers before it. Buckets are
launched strictly in bucket order (as DDP does) so every rank issues the same collectives in the
same order whatever order its hooks fire in. `finish` waits for every handle (launching, in
order, any bucket whose hook did not fire) and writes SUM / world back into each gradient: the
same sums as grads.py's after-backward path (grads.py's docstring has the scaling).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import grads
from .errors import guarded
from .grads import buckets, copy_flat_into, unique_params
from .placement import is_expert_param


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    ready: set[int] = field(default_factory=set)  # indices into params
    flat: Tensor | None = None  # the reduced buffer in flight
    work: dist.Work | None = None


class ExpertGradReducer:
    """Async, bucketed all-reduce of the expert gradients over `group` (the dp group), started by
    gradient hooks in the last micro-batch's backward and finished by `finish`. world: the
    divisor (the world size). Reverse module order approximates the order backward produces
    them, so the first bucket (the last layers' experts) fills first."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None,
        world: int,
        bucket_elems: int | None = None,
    ):
        self.group, self.world = group, world
        params = [p for _, p in unique_params(model) if is_expert_param(p) and p.requires_grad]
        params.reverse()
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        size = grads.BUCKET_ELEMS if bucket_elems is None else bucket_elems
        self.buckets = [
            _Bucket(cast(list[nn.Parameter], b))
            for ps in by_dtype.values()
            for b in buckets(list(ps), size)
        ]
        self._next = 0  # the next bucket to launch
        self.armed = False
        self._handles = []
        for bi, bucket in enumerate(self.buckets):
            for pi, p in enumerate(bucket.params):
                self._handles.append(
                    p.register_post_accumulate_grad_hook(functools.partial(self._ready, bi, pi))
                )

    def arm(self, last: bool) -> None:
        """Reduce in this micro-batch's backward (`last`) or only accumulate (the others)."""
        self.armed = last

    def _ready(self, bi: int, pi: int, p: Tensor) -> None:
        if not self.armed:
            return
        self.buckets[bi].ready.add(pi)
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        for p in bucket.params:  # no gradient this step (its hook did not fire): zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket.flat = torch.cat([cast(Tensor, p.grad).reshape(-1) for p in bucket.params])
        flat = bucket.flat
        bucket.work = guarded(
            "all_reduce(expert gradients over the dp group)",
            lambda: dist.all_reduce(flat, group=self.group, async_op=True),
            "the dp group",
        )

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what is left (in bucket order), wait for every reduction, write SUM / world into
        the gradients and disarm. Call once after the last micro-batch's backward."""
        for bucket in self.buckets[self._next :]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            work, flat = bucket.work, bucket.flat
            assert flat is not None  # launched above
            if work is not None:
                guarded("wait(expert gradient all-reduce)", work.wait, "the dp group")
            flat.div_(self.world)
            copy_flat_into(flat, [cast(Tensor, p.grad) for p in bucket.params])
            bucket.ready.clear()
            bucket.flat = bucket.work = None
        self._next = 0
        self.armed = False

    def remove(self) -> None:
        """Take the hooks off (the reducer is no longer used)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
