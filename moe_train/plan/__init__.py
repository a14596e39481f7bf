"""moe-train-plan: parameters, memory, all-to-all traffic and compute per GPU, at any scale.

    moe-train-plan model=switch_c router=switch cluster.world_size=2048
    python -m moe_train.plan model=m6t_1t router=prototype cluster=v100_32gb \\
        cluster.world_size=480 plan.json=true

Everything is closed-form arithmetic on the config (no GPU, no process group); the parameter count is
cross-checked against the real module built on the `meta` device with one rank's experts. What a
router contributes (gate width, experts per token, destination ranks) is asked of its class in the
router registry.

    config.py      ClusterConfig, PlanOptions, EncDecConfig, ep choices
    params.py      ParamCount, count_params (closed-form parameters)
    costs.py       memory, activations, all-to-all, gradient sync, FLOPs: estimate_step (formulas)
    meta_check.py  one rank's real model on the meta device, against the count
    state_bytes.py one rank's real model sharded by the trainer's rule: its state bytes
    search.py      suggest (the cheapest layout that fits), compare_routers
    planner.py     make_plan: all of the above as one JSON-ready dict
    render.py      the console tables (format_count / format_bytes / format_seconds)
    cli.py         the Hydra entry point (main)
"""

from __future__ import annotations

from .cli import main, plan_from_config, run
from .config import (
    ARCHITECTURES,
    OPTIMIZERS,
    ClusterConfig,
    EncDecConfig,
    GiB,
    PlanOptions,
    ep_choices,
    resolve_ep,
)
from .costs import (
    a2a,
    activation_bytes,
    distinct_ranks,
    estimate_step,
    flops,
    grad_sync,
    memory,
    model_flops_per_token,
    optimizer_bytes,
)
from .meta_check import build_one_rank, meta_check, meta_count
from .params import ParamCount, count_params
from .planner import make_plan
from .render import format_bytes, format_count, format_seconds, render
from .search import compare_routers, router_variants, suggest

__all__ = [
    "ARCHITECTURES",
    "OPTIMIZERS",
    "ClusterConfig",
    "EncDecConfig",
    "GiB",
    "ParamCount",
    "PlanOptions",
    "a2a",
    "activation_bytes",
    "build_one_rank",
    "compare_routers",
    "count_params",
    "distinct_ranks",
    "ep_choices",
    "estimate_step",
    "flops",
    "format_bytes",
    "format_count",
    "format_seconds",
    "grad_sync",
    "main",
    "make_plan",
    "memory",
    "model_flops_per_token",
    "meta_check",
    "meta_count",
    "optimizer_bytes",
    "plan_from_config",
    "render",
    "resolve_ep",
    "router_variants",
    "run",
    "suggest",
]
