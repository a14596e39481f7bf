"""The meta-device check: build one rank's real MoETransformer on `meta` and count its parameters,
to cross-check the closed-form count (no memory, no initialisation, no process group)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from torch import nn


@contextlib.contextmanager
def one_rank_build(ep: int, rank: int = 0) -> Iterator[object]:
    """Build MoETransformer as ep-rank `rank` of `ep` without a process group.

    Yields a stand-in ep_group. Patches, for the duration only: `moe_train.layer.Dispatcher` (reads
    the fake group's size/rank instead of torch.distributed) and ExpertBank.reset_parameters (a
    no-op on meta tensors: its per-expert seeding calls .item(), which fails under
    `torch.device("meta")`).
    """
    from .. import layer
    from ..dispatch import Dispatcher
    from ..experts import ExpertBank

    class _Group:
        def __init__(self, size: int, rank: int):
            self._size, self._rank = size, rank

    class _OneRankDispatcher(Dispatcher):
        def __init__(self, num_experts: int, ep_group: Any = None):
            super().__init__(num_experts, None)
            if isinstance(ep_group, _Group):
                if num_experts % ep_group._size:
                    raise ValueError(
                        f"model.num_experts={num_experts} is not divisible by "
                        f"cluster.ep={ep_group._size}"
                    )
                self.ep, self.ep_rank = ep_group._size, ep_group._rank
                self.num_local = num_experts // self.ep
                self.first_expert = self.ep_rank * self.num_local

    reset = ExpertBank.reset_parameters

    def _reset(self: Any) -> None:
        if not self.w_in.is_meta:
            reset(self)

    saved = layer.Dispatcher
    layer.Dispatcher = _OneRankDispatcher  # type: ignore[misc]
    ExpertBank.reset_parameters = _reset  # type: ignore[method-assign]
    try:
        yield _Group(ep, rank)
    finally:
        layer.Dispatcher = saved  # type: ignore[misc]
        ExpertBank.reset_parameters = reset  # type: ignore[method-assign]


def build_one_rank(model: Any, router: Any, ep: int, rank: int = 0) -> nn.Module:
    """Rank `rank` of `ep`'s MoETransformer on the meta device: the one place that knows how a
    single rank is built without a process group."""
    import torch

    from ..model import MoETransformer

    with one_rank_build(ep, rank) as group, torch.device("meta"):
        return MoETransformer(replace(model), replace(router), ep_group=group)


def meta_count(model: Any, router: Any, ep: int, rank: int = 0) -> dict[str, float]:
    """Parameters of one rank's MoETransformer built on the meta device (no memory, no init)."""
    t0 = time.perf_counter()
    counts = build_one_rank(model, router, ep, rank).num_params()
    return {**counts, "seconds": time.perf_counter() - t0}


def meta_check(model: Any, router: Any, ep: int, analytic: Any) -> dict[str, Any]:
    """meta_count of rank 0 against the decoder-only closed-form count `analytic` (a ParamCount)."""
    mc = meta_count(model, router, ep)
    return {
        **mc,
        "analytic_dense": analytic.dense,
        "analytic_expert_per_rank": analytic.experts // ep,
        "match": mc["dense"] == analytic.dense and mc["expert"] == analytic.experts // ep,
    }
