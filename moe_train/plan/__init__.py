"""moe-train-plan: parameters, memory, all-to-all traffic and compute per GPU, at any scale.

    moe-train-plan model=switch_c router=switch cluster.world_size=2048 \\
        trainer.global_batch_size=2048
    python -m moe_train.plan model=m6t_1t router=prototype cluster=v100_32gb \\
        cluster.world_size=480 trainer.global_batch_size=480 plan.json=true

The plan is of the trainer's own TrainConfig (composed as `moe-train` composes it, checked by its
own validate()) on a machine (ClusterConfig: hardware only). Everything is closed-form arithmetic
on the configs (no GPU, no process group); the parameter count is cross-checked against the real
module built on the `meta` device with one rank's experts. What a router contributes (gate width,
experts per token, destination ranks) is asked of its class in the router registry.

    config.py      ClusterConfig (the machine), PlanOptions, EncDecConfig, ep choices
    options.py     which trainer fields the plan reads (PLANNED) and which not; the trainer's
                   checks of a config on a world; a config written as moe-train overrides
    params.py      ParamCount, count_params (closed-form parameters)
    costs.py       memory, activations, all-to-all, gradient sync, FLOPs: estimate_step (formulas)
    meta_check.py  one rank's real model on the meta device, against the count
    state_bytes.py one rank's real model sharded by the trainer's rule: its state bytes
    search.py      suggest (the cheapest change of the trainer's options that fits), routers
    planner.py     make_plan: all of the above as one JSON-ready dict
    render.py      the console tables (format_count / format_bytes / format_seconds)
    cli.py         the command line (main): moe-train's overrides + cluster.* + plan.*
"""

from __future__ import annotations

from .cli import main, plan_from_overrides, run
from .config import ARCHITECTURES, ClusterConfig, EncDecConfig, GiB, PlanOptions, ep_choices
from .costs import (
    OPTIMIZER_STATE_BYTES,
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
from .options import NO_COST, NOT_MODELLED, PLANNED, largest_ep, validate_setup
from .params import ParamCount, count_params
from .planner import make_plan
from .render import format_bytes, format_count, format_seconds, render
from .search import compare_routers, router_variants, suggest

__all__ = [
    "ARCHITECTURES",
    "NOT_MODELLED",
    "NO_COST",
    "OPTIMIZER_STATE_BYTES",
    "PLANNED",
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
    "largest_ep",
    "main",
    "make_plan",
    "memory",
    "model_flops_per_token",
    "meta_check",
    "meta_count",
    "optimizer_bytes",
    "plan_from_overrides",
    "render",
    "router_variants",
    "run",
    "suggest",
    "validate_setup",
]
