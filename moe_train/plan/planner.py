"""make_plan: the whole plan for one model, router and cluster, as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from .config import OPTIMIZERS, ClusterConfig, PlanOptions, resolve_ep
from .costs import estimate_step
from .meta_check import meta_check
from .params import ParamCount, count_params
from .search import compare_routers, suggest
from .search import options as trainer_options
from .state_bytes import NOT_MODELLED, state_bytes_per_gpu


def _params_section(pc: ParamCount, k: float, ep: int) -> dict[str, Any]:
    return {
        **asdict(pc),
        "dense": pc.dense,
        "total": pc.total,
        "experts_per_token": k,
        "active_dense": pc.dense,
        "active_expert": pc.active_expert(k),
        "dense_per_gpu": pc.dense,
        "expert_per_gpu": pc.experts / ep,
    }


def _suggestions(pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig) -> dict[str, Any]:
    """The cheapest layouts that fit; when they need more GPUs, also the best on the GPUs you
    have with a lighter optimizer (not one of the searched knobs)."""
    cands = suggest(pc, model, router, cluster)
    out: dict[str, Any] = {"suggestion": cands[0] if cands else None, "suggestions": cands[:5]}
    if cands and cands[0]["cluster"]["world_size"] > cluster.world_size:
        for opt in (o for o in OPTIMIZERS if o != cluster.optimizer):
            alt = suggest(pc, model, router, replace(cluster, optimizer=opt), max_scale=1)
            if alt:
                changes = {"optimizer": opt, **alt[0]["changes"]}
                out["suggestion_same_gpus"] = {
                    **alt[0],
                    "changes": changes,
                    "options": trainer_options(changes, alt[0]["cluster"]["ep"]),
                }
                break
    return out


def make_plan(
    model: Any, router: Any, cluster: ClusterConfig, options: PlanOptions | None = None
) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (see costs.py for every formula)."""
    options = options or PlanOptions()
    options.validate()
    model.validate()
    E = router.num_experts_for(model.num_experts)
    router.validate(E)
    cluster.validate(E)
    cluster = resolve_ep(cluster, E)
    ep = cluster.ep or 1

    def pc_fn(r: Any) -> ParamCount:
        return count_params(model, r, options.architecture, options.encoder_decoder)

    pc = pc_fn(router)
    k = router.experts_per_token()
    est = estimate_step(pc, model, router, cluster)
    mem = est["memory"]
    state = state_bytes_per_gpu(model, router, cluster)
    plan: dict[str, Any] = {
        "architecture": options.architecture,
        "total_params": pc.total,
        "active_params": pc.active(k),
        "params_per_gpu": pc.dense + pc.experts / ep,
        "memory_per_gpu_bytes": mem["total"],
        "fits": mem["fits"],
        "state_bytes_per_gpu": state["total"],
        "state_bytes_per_gpu_terms": state,
        # every state element on exactly one GPU (FSDP at its best): the floor for any layout
        "state_floor_bytes_per_gpu": int(
            pc.total * (8 + OPTIMIZERS[cluster.optimizer]) / cluster.world_size
        ),
        "a2a_bytes_per_gpu_per_step": est["a2a"]["bytes_per_gpu_per_step"],
        "params": _params_section(pc, k, ep),
        "cluster": asdict(cluster),
        "dp_expert": cluster.world_size // ep,
        **est,
    }
    if options.meta_check:
        dec = pc if options.architecture == "decoder_only" else count_params(model, router)
        plan["meta_check"] = meta_check(model, router, ep, dec)
    if options.compare_routers:
        plan["routers"] = compare_routers(pc_fn, model, router, cluster)
    if not mem["fits"] and options.suggest:
        plan.update(_suggestions(pc, model, router, cluster))
    plan["not_modelled"] = NOT_MODELLED
    return plan
