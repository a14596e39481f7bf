"""Routers: tokens -> Assignment. Pure tensor math, no communication."""

from __future__ import annotations

from .assignment import Assignment
from .base import Router
from .config import ROUTER_KINDS, RouterConfig
from .expert_choice import ExpertChoiceRouter
from .prototype import PrototypeRouter
from .sam import SAMRouter
from .switch import SwitchRouter
from .topk import TopKRouter
from .tree import TreeRouter

_ROUTERS: dict[str, type[Router]] = {
    "switch": SwitchRouter,
    "topk": TopKRouter,
    "prototype": PrototypeRouter,
    "sam": SAMRouter,
    "expert_choice": ExpertChoiceRouter,
    "tree": TreeRouter,
}


def build_router(cfg: RouterConfig, d_model: int, num_experts: int) -> Router:
    """Build the router of `cfg.kind`. For the tree, num_experts must be 2^(depth+1)-1."""
    if cfg.kind not in _ROUTERS:
        raise ValueError(f"router.kind: got {cfg.kind!r}; allowed: {', '.join(ROUTER_KINDS)}")
    if cfg.kind == "tree" and num_experts != cfg.num_experts_for(num_experts):
        raise ValueError(
            f"model.num_experts: the tree of router.tree_depth={cfg.tree_depth} has "
            f"{cfg.num_experts_for(num_experts)} node experts, got num_experts={num_experts}"
        )
    return _ROUTERS[cfg.kind](cfg, d_model, num_experts)


__all__ = ["Assignment", "Router", "RouterConfig", "ROUTER_KINDS", "build_router"]
