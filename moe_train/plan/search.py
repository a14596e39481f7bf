"""The layout search (the cheapest change of the trainer's options that fits) and the router
comparison on one layout. Candidates are the trainer's own configs, changed with
dataclasses.replace() and checked by the trainer's own validate()."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

from omegaconf import OmegaConf

from ..config import CHECKPOINTING, CONFIG_DIR, OptimConfig, TrainConfig
from ..routing import router_class, router_kinds
from .config import ClusterConfig, ep_choices
from .costs import estimate_step, memory
from .options import as_overrides, changed_options, num_experts, per_rank_batch, validate_setup
from .params import ParamCount

Setup = tuple[TrainConfig, ClusterConfig]


def optim_group(name: str) -> OptimConfig:
    """The OptimConfig that `optim=<name>` composes in moe-train (configs/optim/<name>.yaml)."""
    node = OmegaConf.load(f"{CONFIG_DIR}/optim/{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), node))  # type: ignore[return-value]


def _sharding_options(cfg: TrainConfig) -> list[tuple[bool, bool]]:
    """(parallel.fsdp, parallel.reshard_after_forward) from the configured one towards more
    sharding."""
    reshard = cfg.parallel.reshard_after_forward
    if cfg.parallel.fsdp:
        return sorted({(True, reshard), (True, True)})
    return [(False, reshard), (True, False), (True, True)]


def _micro_batches(cfg: TrainConfig, cluster: ClusterConfig) -> list[int]:
    """trainer.micro_batch_size values from the configured one down: the divisors of the
    sequences per GPU (the accumulation grows to keep the global batch)."""
    micro, accum = per_rank_batch(cfg, cluster)
    per_rank = micro * accum
    return [m for m in range(micro, 0, -1) if per_rank % m == 0]


def _on_world(cfg: TrainConfig, cluster: ClusterConfig, scale: int) -> Setup:
    """`scale` times the GPUs, each with the sequences per step it has now (the global batch
    grows with the world)."""
    if scale == 1:
        return cfg, cluster
    trainer = replace(cfg.trainer, global_batch_size=cfg.trainer.global_batch_size * scale)
    return replace(cfg, trainer=trainer), replace(cluster, world_size=cluster.world_size * scale)


def candidates(cfg: TrainConfig, cluster: ClusterConfig) -> Iterator[Setup]:
    """Every layout of `cfg` on cluster.world_size GPUs that the trainer accepts: parallel.ep x
    FSDP (and its reshard policy) x activation checkpointing (from the configured level up) x
    micro batch."""
    levels = CHECKPOINTING[CHECKPOINTING.index(cfg.trainer.activation_checkpointing) :]
    micro0, _ = per_rank_batch(cfg, cluster)
    for ep, (fsdp, reshard), ckpt, micro in itertools.product(
        ep_choices(num_experts(cfg), cluster.world_size),
        _sharding_options(cfg),
        levels,
        _micro_batches(cfg, cluster),
    ):
        parallel = replace(cfg.parallel, ep=ep, fsdp=fsdp, reshard_after_forward=reshard)
        trainer = replace(cfg.trainer, activation_checkpointing=ckpt)
        if micro != micro0:
            trainer = replace(trainer, micro_batch_size=micro)
        candidate = replace(cfg, parallel=parallel, trainer=trainer)
        try:
            validate_setup(candidate, cluster)
        except ValueError:
            continue  # a layout the trainer refuses (SAM's groups, FSDP with DeepSpeed, ...)
        yield candidate, cluster


def options(base: Setup, new: Setup) -> list[str]:
    """The overrides that train `new` where `base` was planned; parallel.ep always (the trainer's
    default is 1, the plan's may be the largest that divides experts and world)."""
    changes = changed_options(base, new)
    if "parallel.ep" not in changes:
        changes = {"parallel.ep": new[0].parallel.ep, **changes}
    order = ["cluster.", "parallel.", "trainer.", "optim"]
    ranked = sorted(changes, key=lambda k: next(i for i, p in enumerate(order) if k.startswith(p)))
    return as_overrides({k: changes[k] for k in ranked})


def describe(base: Setup, new: Setup, pc: ParamCount) -> dict[str, Any]:
    """A candidate as the plan's JSON holds it: its overrides, layout and costs."""
    cfg, cluster = new
    est = estimate_step(pc, cfg, cluster)
    micro, accum = per_rank_batch(cfg, cluster)
    return {
        "changes": changed_options(base, new),
        "options": options(base, new),
        "cluster": asdict(cluster),
        "parallel": asdict(cfg.parallel),
        "optim": cfg.optim.name,
        "activation_checkpointing": cfg.trainer.activation_checkpointing,
        "global_batch_size": cfg.trainer.global_batch_size,
        "micro_batch_size": micro,
        "grad_accum": accum,
        "step_seconds": est["compute"]["seconds"] + est["a2a"]["seconds"],
        "memory_per_gpu_bytes": est["memory"]["total"],
        "margin_bytes": est["memory"]["margin"],
    }


def suggest(
    pc: ParamCount,
    cfg: TrainConfig,
    cluster: ClusterConfig,
    max_scale: int = 64,
    base: Setup | None = None,
) -> list[dict[str, Any]]:
    """Layouts of `cfg` that fit, cheapest first: fewest GPUs, then fewest changed options, then
    step time; their changes are counted and printed against `base` (default: `cfg` itself).

    Options searched: activation checkpointing, FSDP and its reshard policy, ep, micro batch
    (the accumulation grows to keep the global batch), and the world size (x2 up to x max_scale,
    each GPU keeping its sequences per step)."""
    base = base or (cfg, cluster)
    found: list[tuple[tuple, dict[str, Any]]] = []
    scale = 1
    while scale <= max_scale and not found:
        for new in candidates(*_on_world(cfg, cluster, scale)):
            if not memory(pc, *new)["fits"]:
                continue
            d = describe(base, new, pc)
            found.append(((new[1].world_size, len(d["changes"]), d["step_seconds"]), d))
        scale *= 2
    return [f for _, f in sorted(found, key=lambda kv: kv[0])]


def router_variants(cfg: TrainConfig) -> list[tuple[str, Any]]:
    """(name, RouterConfig): the configured router, then every registered kind with its
    `compare_as` fields and the fields that fit it to parallel.ep (SAM: one group per rank).
    Kinds with compare_as = None, or whose variant does not validate on this model, are left out."""
    router, model, ep = cfg.router, cfg.model, cfg.parallel.ep
    variants = [(router.kind + " (configured)", router)]
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
    pc_fn: Callable[[Any], ParamCount], cfg: TrainConfig, cluster: ClusterConfig
) -> list[dict[str, Any]]:
    """Comm/compute of each router kind on the same model and layout."""
    rows = []
    for name, r in router_variants(cfg):
        pc = pc_fn(r)
        est = estimate_step(pc, replace(cfg, router=r), cluster)
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
