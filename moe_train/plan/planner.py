"""make_plan: the whole plan of one training config on one cluster, as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from ..config import OPTIMIZERS, TrainConfig
from .config import ClusterConfig, PlanOptions
from .costs import OPTIMIZER_STATE_BYTES, estimate_step
from .meta_check import meta_check
from .options import per_rank_batch, planned_values, validate_setup
from .params import ParamCount, count_params
from .search import compare_routers, optim_group, suggest
from .state_bytes import NOT_MODELLED, state_bytes_per_gpu

ASSUMED_VOCAB = 256  # model.vocab_size when a training config leaves it to the data (bytes)


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


def _suggestions(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """The cheapest layouts that fit; when they need more GPUs, also the best on the GPUs you
    have with another optimizer (its config group, as `optim=NAME` composes it)."""
    cands = suggest(pc, cfg, cluster)
    out: dict[str, Any] = {"suggestion": cands[0] if cands else None, "suggestions": cands[:5]}
    if cands and cands[0]["cluster"]["world_size"] > cluster.world_size:
        for name in (o for o in OPTIMIZERS if o != cfg.optim.name):
            other = replace(cfg, optim=optim_group(name))
            alt = suggest(pc, other, cluster, max_scale=1, base=(cfg, cluster))
            if alt:
                out["suggestion_same_gpus"] = alt[0]
                break
    return out


def make_plan(
    cfg: TrainConfig, cluster: ClusterConfig, options: PlanOptions | None = None
) -> dict[str, Any]:
    """The plan of the trainer's config `cfg` on `cluster` as a JSON-ready dict (see costs.py for
    every formula). `cfg` is checked by the trainer's own validate() on cluster.world_size ranks;
    model.vocab_size null (the data's, in training) is taken as 256 (bytes)."""
    options = options or PlanOptions()
    options.validate()
    if cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=ASSUMED_VOCAB))
    validate_setup(cfg, cluster)
    model, router, ep = cfg.model, cfg.router, cfg.parallel.ep

    def pc_fn(r: Any) -> ParamCount:
        return count_params(model, r, options.architecture, options.encoder_decoder)

    pc = pc_fn(router)
    k = router.experts_per_token()
    est = estimate_step(pc, cfg, cluster)
    mem = est["memory"]
    state = state_bytes_per_gpu(cfg, cluster)
    micro, accum = per_rank_batch(cfg, cluster)
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
            pc.total * (8 + OPTIMIZER_STATE_BYTES[cfg.optim.name]) / cluster.world_size
        ),
        "a2a_bytes_per_gpu_per_step": est["a2a"]["bytes_per_gpu_per_step"],
        "params": _params_section(pc, k, ep),
        "cluster": asdict(cluster),
        "trainer_options": planned_values(cfg),  # the trainer's fields the plan depends on
        "batch": {
            "global_batch_size": cfg.trainer.global_batch_size,
            "micro_batch_size": micro,  # per GPU, as the trainer splits the global batch
            "grad_accum": accum,
            "seq_len": model.seq_len,
        },
        "dp_expert": cluster.world_size // ep,
        **est,
    }
    if options.meta_check:
        dec = pc if options.architecture == "decoder_only" else count_params(model, router)
        plan["meta_check"] = meta_check(model, router, ep, dec)
    if options.compare_routers:
        plan["routers"] = compare_routers(pc_fn, cfg, cluster)
    if not mem["fits"] and options.suggest:
        plan.update(_suggestions(pc, cfg, cluster))
    plan["not_modelled"] = NOT_MODELLED
    return plan
