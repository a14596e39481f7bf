"""plan/search.py and planner.py: what fits when the configured layout does not; the routers."""

from __future__ import annotations

from dataclasses import replace

from moe_train.plan import ClusterConfig, compare_routers, count_params, make_plan
from moe_train.routing import RouterConfig
from tests.helpers.plan import FAST, SMALL, model_cfg


def test_impossible_config_says_what_fits() -> None:
    model = model_cfg("switch_c")
    cluster = ClusterConfig(world_size=64, gpu_memory_gb=80, seq_len=512)
    plan = make_plan(model, RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"] and plan["memory"]["margin"] < 0
    s = plan["suggestion"]
    assert s["cluster"]["world_size"] > 64 and s["margin_bytes"] >= 0  # 1.6T needs more GPUs

    # larger ep or FSDP on the same GPUs
    cluster = ClusterConfig(world_size=8, ep=1, gpu_memory_gb=24, reserved_gb=0, seq_len=512)
    plan = make_plan(model_cfg("switch_base"), RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"]
    changes = plan["suggestion"]["changes"]
    assert plan["suggestion"]["cluster"]["world_size"] == 8
    assert changes.get("ep", 1) > 1 or changes.get("fsdp")

    # FSDP for a dense-heavy model: ep does not help, sharding the dense state does
    dense = replace(
        model_cfg("switch_base"), moe_every=0, d_model=4096, n_heads=32, d_ff=16384, n_layers=12
    )
    cluster = ClusterConfig(world_size=8, ep=1, gpu_memory_gb=40, seq_len=512)
    plan = make_plan(dense, RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"] and plan["suggestion"]["changes"].get("fsdp")
    assert "parallel.fsdp=true" in plan["suggestion"]["options"]


def test_compare_routers_rows_follow_the_router_classes() -> None:
    """One row per comparable kind: the tree (its depth fixes the experts) is left out, SAM gets
    one group per ep rank, prototypes drop out when the expert count is odd."""
    cluster = ClusterConfig(world_size=8, ep=4, seq_len=16)
    router = RouterConfig(kind="switch")

    def pc_fn(r):
        return count_params(SMALL, r)

    rows = {r["router"]: r for r in compare_routers(pc_fn, SMALL, router, cluster)}
    assert set(rows) == {
        "switch (configured)",
        "topk top_k=2",
        "prototype top_k=2",
        "sam top_k=2 num_groups=4",
        "expert_choice capacity_factor=2.0",
    }
    assert rows["sam top_k=2 num_groups=4"]["distinct_ranks_per_token"] == 1
    assert rows["expert_choice capacity_factor=2.0"]["experts_per_token"] == 2.0
    odd = replace(SMALL, num_experts=9)
    names = [
        r["router"]
        for r in compare_routers(
            lambda r: count_params(odd, r), odd, router, replace(cluster, ep=3)
        )
    ]
    assert "prototype top_k=2" not in names and "sam top_k=2 num_groups=3" in names
