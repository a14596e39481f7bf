"""The trainer's options as the planner sees them: which fields of ParallelConfig, TrainerConfig,
OptimConfig and DataConfig the plan reads, which it does not (and why), the trainer's own checks
of a planned config on a world of GPUs, and a planned config written as `moe-train` overrides.

Every field of those four configs is in exactly one of PLANNED, NO_COST and NOT_MODELLED
(tests/plan/test_plan_trainer_options.py fails on a new field until it is placed, and checks that
PLANNED fields change the plan and the others do not).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import TrainConfig
from .config import ClusterConfig, ep_choices

# the fields the plan's memory, traffic, FLOPs and state bytes are functions of
PLANNED: dict[str, tuple[str, ...]] = {
    "parallel": ("ep", "fsdp", "reshard_after_forward"),
    "trainer": (
        "global_batch_size",  # with the world: sequences per GPU (TrainerConfig.batch_split)
        "micro_batch_size",
        "precision",
        "engine",
        "zero_stage",
        "activation_checkpointing",
    ),
    "optim": ("name",),
}

# fields that cost no GPU memory and no step time (or cost outside the plan's one step)
NO_COST: dict[str, str] = {
    "parallel.timeout_s": "a collective timeout",
    "parallel.backend": "nccl on GPUs",
    "trainer.max_steps": "the plan is one optimizer step",
    "trainer.log_every": "a metrics record",
    "trainer.keep_checkpoints": "disk, not GPU memory",
    "trainer.run_dir": "a folder",
    "trainer.resume": "where the run starts",
    "trainer.progress": "the console",
    "trainer.tensorboard": "a log file",
    "trainer.wandb": "a log sink",
    "trainer.wandb_project": "a log sink",
    "trainer.wandb_run_name": "a log sink",
    "trainer.print_config": "the console",
    "trainer.threads": "CPU threads",
    "trainer.host_memory": "the host allocator (CPU memory)",
    "trainer.max_skipped_steps": "a stop rule",
    "trainer.stop_signals": "a stop rule (one all-reduce of two int32 per step)",
    "trainer.time_limit": "a stop rule",
    "trainer.stall_timeout_s": "a watchdog thread",
    "optim.lr": "the same tensors at any learning rate",
    "optim.min_lr_ratio": "the schedule",
    "optim.warmup_steps": "the schedule",
    "optim.weight_decay": "the same tensors",
    "optim.beta1": "the same tensors",
    "optim.beta2": "the same tensors",
    "optim.eps": "the same tensors",
    "optim.beta2_decay": "the same tensors",
    "optim.grad_clip": "one scalar all-reduce per step",
    "data.dir": "where the tokens come from (read on the host)",
    "data.mix": "which sources the tokens come from (read on the host)",
    "data.sampling": "which windows are read (on the host)",
    "data.holdout": "which documents are validation data",
    "data.verify_checksums": "one read of the data at start",
    "data.default_corpus_bytes": "the size of the default corpus (on disk)",
    "data.cache_dir": "a folder",
}

# fields that cost memory or time the plan does not model (listed in the plan's not_modelled)
NOT_MODELLED: dict[str, str] = {
    "parallel.hierarchical_a2a": "the all-to-all is timed as one flat exchange",
    "parallel.ranks_per_node": "nodes are cluster.gpus_per_node GPUs",
    "parallel.overlap_grad_sync": "gradient sync is not overlapped with backward",
    "trainer.eval_every": "validation passes between steps",
    "trainer.eval_batches": "validation passes between steps",
    "trainer.ckpt_every": "checkpoint writes between steps",
    "trainer.async_checkpoint": "the host copy of a background checkpoint",
    "trainer.compile": "compiled kernels' speed-up and activation memory",
    "optim.impl": "the optimizer step's own time (apex and torch keep the same state)",
    "data.document_mask": "the [B, 1, T, T] bool mask of a micro-batch and SDPA's additive copy "
    "of it per layer (masked attention runs without the flash kernel)",
}

GROUPS = tuple(PLANNED)  # the TrainConfig fields whose options the planner searches and prints


def planned_values(cfg: TrainConfig) -> dict[str, Any]:
    """The PLANNED fields of `cfg`, as {"parallel.ep": 8, ...}."""
    return {
        f"{group}.{name}": getattr(getattr(cfg, group), name)
        for group, names in PLANNED.items()
        for name in names
    }


def per_rank_batch(cfg: TrainConfig, cluster: ClusterConfig) -> tuple[int, int]:
    """(micro batch, gradient accumulation) per GPU, split as the trainer splits the global batch
    over the world (every rank reads its own share)."""
    return cfg.trainer.batch_split(cluster.world_size)


def num_experts(cfg: TrainConfig) -> int:
    return cfg.router.num_experts_for(cfg.model.num_experts)


def validate_setup(cfg: TrainConfig, cluster: ClusterConfig) -> None:
    """The trainer's own start-up checks of `cfg` on cluster.world_size ranks (TrainConfig,
    ParallelConfig on that world, the batch split) and the cluster's; ValueError names the key."""
    cluster.validate()
    cfg.validate()
    world, E, ep = cluster.world_size, num_experts(cfg), cfg.parallel.ep
    if ep >= 1 and ep not in ep_choices(E, world):
        raise ValueError(
            f"parallel.ep={ep} must divide both the {E} experts and the {world} GPUs "
            f"(cluster.world_size); choose among {ep_choices(E, world)}"
        )
    cfg.parallel.validate(world, E, cfg.router)
    per_rank_batch(cfg, cluster)


def largest_ep(cfg: TrainConfig, world: int) -> int:
    """The largest parallel.ep the trainer accepts on `world` ranks (it divides the experts and
    the world, and the router's layout rule holds: SAM's groups); the planner's choice when the
    command line names no parallel.ep."""
    E, err = num_experts(cfg), None
    for ep in reversed(ep_choices(E, world)):
        try:
            dataclasses.replace(cfg.parallel, ep=ep).validate(world, E, cfg.router)
            return ep
        except ValueError as e:
            err = e
    assert err is not None  # ep_choices always holds 1
    raise err


def changed_options(
    base: tuple[TrainConfig, ClusterConfig], new: tuple[TrainConfig, ClusterConfig]
) -> dict[str, Any]:
    """The overrides that turn `base` into `new`: cluster.world_size, then every changed field of
    parallel and trainer, then optim as its config group (optim=adafactor selects a whole file)."""
    (cfg0, cluster0), (cfg, cluster) = base, new
    out: dict[str, Any] = {}
    if cluster.world_size != cluster0.world_size:
        out["cluster.world_size"] = cluster.world_size
    for group in ("parallel", "trainer"):
        old, now = getattr(cfg0, group), getattr(cfg, group)
        for f in dataclasses.fields(now):
            if getattr(now, f.name) != getattr(old, f.name):
                out[f"{group}.{f.name}"] = getattr(now, f.name)
    if cfg.optim != cfg0.optim:
        out["optim"] = cfg.optim.name
    return out


def show(value: Any) -> str:
    """A value as an override spells it (null, true, false)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def as_overrides(changes: dict[str, Any]) -> list[str]:
    """["parallel.ep=480", "optim=adafactor", ...] in the order of `changes`."""
    return [f"{key}={show(value)}" for key, value in changes.items()]
