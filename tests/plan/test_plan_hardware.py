"""The planner says what hardware it assumes, and its JSON holds integer byte counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe_train.plan import ClusterConfig, PlanOptions, make_plan
from moe_train.plan.cli import _jsonable
from moe_train.plan.render import render
from tests.helpers.plan import train_cfg

FAST = PlanOptions(meta_check=False, compare_routers=False, suggest=False)


def test_header_names_the_gpu_memory_peak_and_links():
    cluster = ClusterConfig(gpu="H100-SXM5-80GB", intra_node_gbps=300, inter_node_gbps=40)
    text = render(make_plan(train_cfg(), cluster, FAST), {})
    header = text.splitlines()[1]
    assert header.startswith("hardware: H100-SXM5-80GB, 8 per node, 80 GiB each")
    assert "peak 989.5 TFLOP/s" in header and "150 TFLOP/s achieved" in header
    assert "300 GB/s in a node, 40 GB/s across nodes" in header
    unknown = render(make_plan(train_cfg(), ClusterConfig(gpu="TPU"), FAST), {})
    assert "peak unknown" in unknown


def test_json_byte_counts_are_integers():
    # an odd world makes FSDP's per-GPU shares fractional before rounding
    cluster = ClusterConfig(world_size=6, gpus_per_node=6)
    cfg = train_cfg(parallel={"ep": 2, "fsdp": True}, trainer={"global_batch_size": 6})
    plan = _jsonable(make_plan(cfg, cluster, FAST))
    for key, value in plan["memory"].items():
        assert isinstance(value, bool if key == "fits" else int), key
    assert isinstance(plan["a2a"]["bytes_per_gpu_per_step"], int)
    assert all(isinstance(v, int) for k, v in plan["grad_sync"].items() if "bytes" in k)
    assert isinstance(plan["a2a"]["seconds"], float)  # not every number is a byte count


@pytest.mark.slow
def test_cli_json_and_a_model_whose_vocabulary_comes_from_the_data():
    done = subprocess.run(
        [sys.executable, "-m", "moe_train.plan", "model=small", "cluster=v100_32gb", "plan.json=true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["cluster"]["gpu"] == "V100-SXM2-32GB"
    assert isinstance(plan["memory_per_gpu_bytes"], int)
