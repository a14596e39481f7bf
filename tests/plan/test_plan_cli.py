"""plan/cli.py and render.py: the command line, its JSON, its errors and its tables."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from moe_train.plan import (
    PLANNED,
    ClusterConfig,
    GiB,
    PlanOptions,
    format_bytes,
    format_count,
    format_seconds,
    make_plan,
    plan_from_overrides,
    render,
)
from moe_train.plan.cli import render_help
from moe_train.routing import RouterConfig
from tests.helpers.plan import FAST, ROOT, SMALL, train_cfg


def test_bad_ep_is_named() -> None:
    with pytest.raises(ValueError, match="parallel.ep"):
        make_plan(train_cfg(parallel={"ep": 3}), ClusterConfig(world_size=8), FAST)


@pytest.mark.parametrize(
    "cfg,cluster,key",
    [
        (
            train_cfg(router=RouterConfig(capacity_factor=math.nan)),
            ClusterConfig(),
            "router.capacity_f",
        ),
        (
            train_cfg(router=RouterConfig(z_loss_coef=math.nan)),
            ClusterConfig(),
            "router.z_loss_coef",
        ),
        (train_cfg(), ClusterConfig(tflops=math.inf), "cluster.tflops"),
        (train_cfg(), ClusterConfig(reserved_gb=math.nan), "cluster.reserved_gb"),
        (train_cfg(), ClusterConfig(reserved_gb=-1.0), "cluster.reserved_gb"),
        (train_cfg(optim={"name": "sgd"}), ClusterConfig(), "optim.name"),
        (train_cfg(trainer={"activation_checkpointing": "yes"}), ClusterConfig(), "trainer.act"),
        (train_cfg(model=replace(SMALL, seq_len=0)), ClusterConfig(), "model.seq_len"),
        (train_cfg(trainer={"global_batch_size": 12}), ClusterConfig(), "global_batch_size"),
    ],
)
def test_non_finite_and_out_of_range_fields_are_named(cfg, cluster, key) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_plan(cfg, cluster, FAST)


def test_formatters() -> None:
    assert format_count(1571.3e9) == "1.571T" and format_count(999) == "999"
    assert format_bytes(1.5 * GiB) == "1.50 GiB"
    assert (format_seconds(0.0125), format_seconds(2.5)) == ("12.5 ms", "2.50 s")


def test_render_shows_every_section_and_the_fix() -> None:
    memory = 95_000 / GiB  # 104 KB needed as configured; checkpointing brings it under
    cluster = ClusterConfig(world_size=8, gpu_memory_gb=memory, reserved_gb=0)
    cfg = train_cfg(router=RouterConfig(kind="topk"), trainer={"global_batch_size": 8})
    plan = make_plan(cfg, cluster, PlanOptions(meta_check=False))
    text = render(plan, {"model": "small", "router": "topk"})
    for title in ("Parameters", "Memory per GPU", "Per optimizer step", "Routers on this layout"):
        assert title in text
    assert "DOES NOT FIT" in text and "trainer.activation_checkpointing=" in text


def plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m moe_train.plan` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "moe_train.plan", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_cli_json() -> None:
    done = plan_cli(
        "model=tiny",
        "router=sam",
        "router.num_groups=2",
        "cluster.world_size=4",
        "parallel.ep=2",
        "plan.json=true",
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    for key in (
        "total_params",
        "active_params",
        "params_per_gpu",
        "memory_per_gpu_bytes",
        "fits",
        "a2a_bytes_per_gpu_per_step",
    ):
        assert key in plan
    assert plan["meta_check"]["match"] and plan["fits"]
    assert plan["a2a"]["distinct_ranks_per_token"] == 1  # SAM: one copy per token
    assert plan["memory_per_gpu_bytes"] < 80 * GiB

    bad = plan_cli("model=tiny", "parallel.ep=3")
    assert bad.returncode != 0 and "parallel.ep" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("key", ["router.capacity_factor", "router.z_loss_coef"])
def test_cli_names_a_nan_router_field(key: str) -> None:
    bad = plan_cli("model=tiny", f"{key}=nan")
    assert bad.returncode != 0 and key in bad.stderr


@pytest.mark.parametrize(
    "arg,fix",
    [
        ("cluster.ep=2", "use parallel.ep"),
        ("cluster.micro_batch_size=2", "use trainer.micro_batch_size"),
        ("cluster.grad_accum=2", "use trainer.global_batch_size"),
        ("cluster.seq_len=64", "use model.seq_len"),
        ("cluster.optimizer=adafactor", "use optim=NAME"),
        ("parallel.ep=null", "leave it out"),
    ],
)
def test_a_trainer_option_under_its_old_name_names_the_trainers_key(arg: str, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        plan_from_overrides(["model=tiny", arg])


def test_help_lists_the_machine_and_the_trainer_fields_the_plan_reads() -> None:
    text = render_help([])
    for f in dataclasses.fields(ClusterConfig):
        assert f"cluster.{f.name} [" in text
    for group, names in PLANNED.items():
        assert all(f"{group}.{name}" in text for name in names)
    assert "cluster.ep" not in text and "cluster   a100_80gb*, v100_32gb" in text
