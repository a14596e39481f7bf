"""The planner plans only what the trainer does: M6-T 1T on 480 V100-32GB says which trainer
options fit (and why AdamW cannot), and every option it names composes into a valid training
config."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_train.config import CONFIG_DIR, OptimConfig, TrainConfig, TrainerConfig, register_configs
from moe_train.data import DataConfig, MixSource
from moe_train.parallel import ParallelConfig
from moe_train.plan import (
    NO_COST,
    NOT_MODELLED,
    PLANNED,
    ClusterConfig,
    PlanOptions,
    largest_ep,
    make_plan,
    plan_from_overrides,
)
from moe_train.routing import RouterConfig
from tests.helpers.plan import FAST, model_cfg, train_cfg

V100 = {"gpu_memory_gb": 32, "gpus_per_node": 8, "intra_node_gbps": 50, "inter_node_gbps": 1.5,
        "tflops": 50}  # fmt: skip


def _m6t_plan() -> dict:
    cluster = ClusterConfig(world_size=480, **V100)
    router = RouterConfig(kind="prototype", top_k=2)
    options = PlanOptions(meta_check=False, compare_routers=False)
    cfg = TrainConfig(model=model_cfg("m6t_1t"), router=router)
    cfg.trainer.global_batch_size = 480  # one sequence per GPU
    cfg.parallel.ep = largest_ep(cfg, 480)  # no parallel.ep given
    return make_plan(cfg, cluster, options)


def test_m6t_on_480_v100_fits_with_adafactor_not_adamw() -> None:
    plan = _m6t_plan()
    assert not plan["fits"]  # AdamW: 16 bytes per parameter do not fit whatever the sharding
    assert plan["state_floor_bytes_per_gpu"] > 30 * 2**30
    assert plan["suggestion"]["cluster"]["world_size"] > 480
    same = plan["suggestion_same_gpus"]
    assert same["cluster"]["world_size"] == 480 and same["margin_bytes"] >= 0
    assert "optim=adafactor" in same["options"] and "parallel.ep=480" in same["options"]
    assert isinstance(plan["state_bytes_per_gpu"], int)


def test_every_suggested_option_is_a_trainer_option() -> None:
    plan = _m6t_plan()
    suggested = [plan["suggestion_same_gpus"], *plan["suggestions"]]
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for s in suggested:
            overrides = [o for o in s["options"] if not o.startswith("cluster.")]
            cfg = compose("train", overrides=["model=m6t_1t", "router=prototype", *overrides])
            train_cfg: TrainConfig = OmegaConf.to_object(cfg)
            train_cfg.validate()


# a value of each PLANNED field that changes the plan, and the other fields it needs to matter
PLANNED_CHANGES: dict[str, tuple[dict[str, Any], Any]] = {
    "parallel.ep": ({}, 4),
    "parallel.fsdp": ({}, True),
    "parallel.reshard_after_forward": ({"parallel.fsdp": True}, False),
    "trainer.global_batch_size": ({}, 16),
    "trainer.micro_batch_size": ({}, 1),
    "trainer.precision": ({}, "fp32"),
    "trainer.engine": ({}, "deepspeed"),
    "trainer.zero_stage": ({"trainer.engine": "deepspeed"}, 2),
    "trainer.activation_checkpointing": ({}, "full"),
    "optim.name": ({}, "adafactor"),
}
SECTIONS = {
    "parallel": ParallelConfig, "trainer": TrainerConfig, "optim": OptimConfig, "data": DataConfig,
}  # fmt: skip
# valid other values of the fields whose type alone does not give one
OTHER_VALUES: dict[str, Any] = {
    "optim.impl": "apex",
    "trainer.compile": "blocks",
    "trainer.host_memory": "release",
    "data.dir": "data/elsewhere",
    "data.mix": [MixSource(path="data/web")],
    "data.sampling": "epoch",
    "data.cache_dir": "cache/elsewhere",
    "trainer.stop_signals": ["SIGUSR1"],
    "trainer.time_limit": "3h50m",
    "trainer.stall_timeout_s": 600.0,
}


def _with(cfg: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    for key, value in changes.items():
        group, name = key.split(".")
        cfg = replace(cfg, **{group: replace(getattr(cfg, group), **{name: value})})
    return cfg


def _other_value(cfg: TrainConfig, key: str) -> Any:
    """A valid value of `key` other than cfg's (for the fields the plan does not read)."""
    group, name = key.split(".")
    value = getattr(getattr(cfg, group), name)
    if key == "parallel.backend":
        return "nccl"
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2  # inside every range the trainer checks (betas, ratios, timeouts)
    if isinstance(value, int):
        return value + 1
    if key in OTHER_VALUES:
        return OTHER_VALUES[key]
    if value is None:
        return 2
    return value + "-other"


def _numbers(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan without its echo of the configured values (what the trainer would measure)."""
    return {k: v for k, v in plan.items() if k not in ("trainer_options", "batch")}


def _base() -> TrainConfig:
    return train_cfg(parallel={"ep": 2}, trainer={"global_batch_size": 8})


def test_every_trainer_field_is_planned_or_listed_as_not_costing() -> None:
    """A new field of ParallelConfig, TrainerConfig, OptimConfig or DataConfig fails here until it is placed
    in moe_train.plan.options: PLANNED (the plan reads it), NO_COST or NOT_MODELLED."""
    planned = {f"{g}.{n}" for g, names in PLANNED.items() for n in names}
    listed = [*planned, *NO_COST, *NOT_MODELLED]
    fields = {f"{g}.{f.name}" for g, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert len(listed) == len(set(listed)), "a field in two of PLANNED, NO_COST, NOT_MODELLED"
    assert not set(listed) - fields, f"not trainer fields: {sorted(set(listed) - fields)}"
    assert not fields - set(listed), (
        f"trainer options the planner neither reads nor lists: {sorted(fields - set(listed))}; "
        "place each in moe_train/plan/options.py (PLANNED, NO_COST or NOT_MODELLED)"
    )
    assert set(PLANNED_CHANGES) == planned


@pytest.mark.parametrize("key", sorted(PLANNED_CHANGES))
def test_a_planned_field_changes_the_plan(key: str) -> None:
    needs, value = PLANNED_CHANGES[key]
    cluster = ClusterConfig(world_size=4)
    before = _with(_base(), needs)
    after = _with(before, {key: value})
    assert _numbers(make_plan(after, cluster, FAST)) != _numbers(make_plan(before, cluster, FAST))


@pytest.mark.parametrize("key", sorted([*NO_COST, *NOT_MODELLED]))
def test_a_field_listed_as_not_costing_leaves_the_plan_alone(key: str) -> None:
    cluster, base = ClusterConfig(world_size=4), _base()
    changed = _with(base, {key: _other_value(base, key)})
    changed.validate()  # a value the trainer accepts
    assert changed != base
    plan = make_plan(changed, cluster, FAST)
    assert plan == make_plan(base, cluster, FAST)
    if key in NOT_MODELLED:
        assert any(key in line for line in plan["not_modelled"])


def test_suggested_overrides_plan_what_was_suggested() -> None:
    """The overrides of a suggestion, added to the command line, plan a layout that fits with the
    memory the suggestion said (the planner prints the trainer's own overrides)."""
    args = ["model=tiny", "trainer.global_batch_size=8", "cluster.world_size=4",
            "cluster.gpu_memory_gb=0.0022", "cluster.reserved_gb=0", "plan.compare_routers=false",
            "plan.meta_check=false"]  # fmt: skip
    plan, _, _ = plan_from_overrides(args)
    assert not plan["fits"] and plan["suggestion"]["cluster"]["world_size"] == 4
    for s in plan["suggestions"]:
        again, _, _ = plan_from_overrides([*args, *s["options"]])
        assert again["fits"] and again["memory_per_gpu_bytes"] == s["memory_per_gpu_bytes"]
