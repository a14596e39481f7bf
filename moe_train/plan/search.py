"""The layout search (the cheapest change that fits) and the router comparison on one layout."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from ..routing import router_class, router_kinds
from .config import CHECKPOINTING, TRAINER_OPTIONS, ClusterConfig, ep_choices
from .costs import estimate_step, memory
from .params import ParamCount


def _halvings(x: int) -> list[int]:
    out = [x]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _sharding_options(cluster: ClusterConfig) -> list[tuple[bool, bool]]:
    """(fsdp, reshard_after_forward) from the configured one towards more sharding."""
    if cluster.fsdp:
        return sorted({(True, cluster.reshard_after_forward), (True, True)})
    return [(False, cluster.reshard_after_forward), (True, False), (True, True)]


def _layouts(cluster: ClusterConfig, num_experts: int, world: int) -> list[ClusterConfig]:
    """Every candidate on `world` GPUs: ep x FSDP (and its reshard policy) x activation
    checkpointing (from the configured level up) x micro batch (grad_accum grows to keep the
    tokens per GPU per step). All are trainer options (config.TRAINER_OPTIONS)."""
    mb0 = cluster.micro_batch_size
    levels = CHECKPOINTING[CHECKPOINTING.index(cluster.activation_checkpointing) :]
    return [
        replace(
            cluster,
            world_size=world,
            ep=ep,
            fsdp=fsdp,
            reshard_after_forward=reshard,
            activation_checkpointing=ckpt,
            micro_batch_size=mb,
            grad_accum=cluster.grad_accum * mb0 // mb,
        )
        for ep, (fsdp, reshard), ckpt, mb in itertools.product(
            ep_choices(num_experts, world), _sharding_options(cluster), levels, _halvings(mb0)
        )
    ]


def options(changes: dict[str, Any], ep: int | None = None) -> list[str]:
    """The trainer's command-line overrides for a suggestion's changes (parallel.ep always: the
    trainer's default is 1, the plan's the largest that divides experts and world)."""
    if ep is not None and "ep" not in changes:
        changes = {**changes, "ep": ep}
    order = list(TRAINER_OPTIONS)  # GPUs first, then the trainer's groups in a fixed order
    changes = dict(
        sorted(changes.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    )
    out = []
    for key, value in changes.items():
        name = TRAINER_OPTIONS.get(key, f"cluster.{key}")
        shown = str(value).lower() if isinstance(value, bool) else value
        out.append(f"{name}={shown}")
    return out


def suggest(
    pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig, max_scale: int = 64
) -> list[dict[str, Any]]:
    """Layouts that fit, cheapest first: fewest GPUs, then fewest changed knobs, then step time.

    Knobs: activation checkpointing, FSDP and its reshard policy, ep, micro batch (grad_accum grows
    to keep the tokens per GPU per step), and the world size (x2 up to x max_scale)."""
    E = router.num_experts_for(model.num_experts)
    found: list[tuple[tuple, dict[str, Any]]] = []
    scale = 1
    while scale <= max_scale and not found:
        world = cluster.world_size * scale
        for c in _layouts(cluster, E, world):
            mem = memory(pc, model, router, c)
            if not mem["fits"]:
                continue
            changes = {
                k: v for k, v in asdict(c).items() if v != getattr(cluster, k) and k != "grad_accum"
            }
            est = estimate_step(pc, model, router, c)
            step = est["compute"]["seconds"] + est["a2a"]["seconds"]
            found.append(
                (
                    (world, len(changes), step),
                    {
                        "changes": changes,
                        "options": options(changes, c.ep),
                        "cluster": asdict(c),
                        "step_seconds": step,
                        "memory_per_gpu_bytes": mem["total"],
                        "margin_bytes": mem["margin"],
                    },
                )
            )
        scale *= 2
    return [f for _, f in sorted(found, key=lambda kv: kv[0])]


def router_variants(model: Any, router: Any, cluster: ClusterConfig) -> list[tuple[str, Any]]:
    """(name, RouterConfig): the configured router, then every registered kind with its
    `compare_as` fields and the fields that fit it to cluster.ep (SAM: one group per rank).
    Kinds with compare_as = None, or whose variant does not validate on this model, are left out."""
    variants = [(router.kind + " (configured)", router)]
    ep = cluster.ep or 1
    configured = router_class(router.kind)
    for kind in router_kinds():
        cls = router_class(kind)
        if cls is configured or cls.compare_as is None:
            continue
        fields: dict[str, Any] = dict(cls.compare_as)
        E = cls.num_experts_for(replace(router, kind=kind, **fields), model.num_experts)
        fields.update(cls.layout_fields(replace(router, kind=kind, **fields), E, ep))
        variant = replace(router, kind=kind, **fields)
        try:
            variant.validate(E)
        except ValueError:
            continue  # e.g. two prototypes of an odd expert count
        variants.append((kind + "".join(f" {k}={v}" for k, v in fields.items()), variant))
    return variants


def compare_routers(
    pc_fn: Callable[[Any], ParamCount], model: Any, router: Any, cluster: ClusterConfig
) -> list[dict[str, Any]]:
    """Comm/compute of each router kind on the same model and layout."""
    rows = []
    for name, r in router_variants(model, router, cluster):
        pc = pc_fn(r)
        est = estimate_step(pc, model, r, cluster)
        k = r.experts_per_token()
        rows.append(
            {
                "router": name,
                "experts_per_token": k,
                "active_params": pc.active(k),
                "distinct_ranks_per_token": est["a2a"]["distinct_ranks_per_token"],
                "a2a_bytes_per_gpu_per_step": est["a2a"]["bytes_per_gpu_per_step"],
                "a2a_seconds": est["a2a"]["seconds"],
                "compute_seconds": est["compute"]["seconds"],
                "comm_compute_ratio": est["comm_compute_ratio"],
            }
        )
    return rows
