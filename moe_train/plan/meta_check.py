"""The meta-device check: build one rank's real MoETransformer on `meta` and count its parameters,
to cross-check the closed-form count (no memory, no initialisation, no process group)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import MoETransformer


def build_one_rank(model: Any, router: Any, ep: int, rank: int = 0) -> MoETransformer:
    """Rank `rank` of `ep`'s MoETransformer on the meta device: the one place that knows how a
    single rank is built without a process group."""
    import torch

    from ..model import MoETransformer
    from ..parallel import ExpertShard

    with torch.device("meta"):
        return MoETransformer(replace(model), replace(router), shard=ExpertShard(ep, rank))


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
