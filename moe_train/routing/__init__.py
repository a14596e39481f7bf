"""Routers: tokens -> Assignment. Pure tensor math, no communication.

Every router kind is one module that registers its class (registry.py). The built-in modules are
imported below in the order `router_kinds()` lists them (the planner's comparison table follows it).
"""

from __future__ import annotations

from .assignment import Assignment
from .base import Router
from .config import RouterConfig
from .context import RouteContext, RouteKey
from .registry import register_router, router_class, router_kinds, unregister_router

# isort: off
from .switch import SwitchRouter
from .topk import TopKRouter
from .prototype import PrototypeRouter
from .sam import SAMRouter
from .expert_choice import ExpertChoiceRouter
from .tree import TreeRouter

# isort: on


def build_router(cfg: RouterConfig, d_model: int, num_experts: int) -> Router:
    """Build the router of `cfg.kind` (validated; the tree needs num_experts = 2^(depth+1)-1)."""
    return router_class(cfg.kind)(cfg, d_model, num_experts)


__all__ = [
    "Assignment",
    "ExpertChoiceRouter",
    "PrototypeRouter",
    "RouteContext",
    "RouteKey",
    "Router",
    "RouterConfig",
    "SAMRouter",
    "SwitchRouter",
    "TopKRouter",
    "TreeRouter",
    "build_router",
    "register_router",
    "router_class",
    "router_kinds",
    "unregister_router",
]
