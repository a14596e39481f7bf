"""Aux-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

Each topk router with router.bias_update_rate > 0 holds `score_bias` [E] (float32, by global
expert id, the same on every rank), added to the scores that choose experts and never to the
weights. The train step (training/step.py, the one owner for every engine) sums each router's
chosen-expert counts over its micro-batches, all-reduces them over the world once per step, and
after an applied optimizer step moves every bias by rate * sign(mean load - load). Every rank
sees the same global counts, so 1 process and N ranks keep identical biases.

torchtitan (components/optimizer/optimizer.py `_update_expert_bias`) applies the same sign rule
and then subtracts the mean of the update; a constant shift of all biases changes no choice (nor
any group's top-2 sum ordering), so the two choose alike (tests/routing/test_balancing.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import Router


def biased_routers(model: nn.Module) -> list[Router]:
    """The routers of `model` that balance by a bias, in module order."""
    return [m for m in model.modules() if isinstance(m, Router) and m.score_bias is not None]


def choice_loads(routers: list[Router]) -> Tensor:
    """[L, E] int64: experts chosen (before capacity) in each router's last call; zeros for a
    router that has not routed yet."""
    rows = []
    for r in routers:
        load = r.last_choice_load
        if load is None:
            load = torch.zeros(r.num_experts, dtype=torch.int64, device=r.gate.weight.device)
        rows.append(load)
    return torch.stack(rows)


def global_loads(loads: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum [L, E] counts over the ranks of `group` (the world by default) when distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        loads = loads.clone()
        dist.all_reduce(loads, group=group)
    return loads


@torch.no_grad()
def bias_update(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """bias [E] + rate * sign(mean(load) - load): under-loaded experts up, over-loaded down."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)


@torch.no_grad()
def update_biases(routers: list[Router], loads: Tensor) -> None:
    """Move each router's bias by its router.bias_update_rate from its global load row."""
    for router, load in zip(routers, loads, strict=True):
        bias = router.score_bias
        if bias is not None:  # biased_routers chose routers with one
            bias.copy_(bias_update(bias.float(), load, router.cfg.bias_update_rate))


class BiasBalancer:
    """The step path's handle: `add()` after every micro-batch, `step(applied)` after the
    optimizer step (one all-reduce of [L, E] counts; the update only when the step applied)."""

    def __init__(self, model: nn.Module):
        self.routers = biased_routers(model)
        self.loads: Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.routers)

    def add(self) -> None:
        loads = choice_loads(self.routers)
        for r in self.routers:  # read once: a router that routes no token next time adds zeros
            r.last_choice_load = None
        self.loads = loads if self.loads is None else self.loads + loads

    def step(self, applied: bool) -> None:
        if self.loads is None:
            return
        loads = global_loads(self.loads)
        self.loads = None
        if applied:
            update_biases(self.routers, loads)
