"""plan/search.py and planner.py: what fits when the configured layout does not; the routers."""

from __future__ import annotations

from dataclasses import replace

from moe_train.plan import ClusterConfig, compare_routers, count_params, largest_ep, make_plan
from moe_train.routing import RouterConfig
from tests.helpers.plan import FAST, SMALL, model_cfg, train_cfg


def test_impossible_config_says_what_fits() -> None:
    model = replace(model_cfg("switch_c"), seq_len=512)
    cluster = ClusterConfig(world_size=64, gpu_memory_gb=80)
    cfg = train_cfg(
        model=model, router=RouterConfig(kind="switch"), trainer={"global_batch_size": 64}
    )
    cfg = replace(cfg, parallel=replace(cfg.parallel, ep=largest_ep(cfg, 64)))  # none given
    plan = make_plan(cfg, cluster, FAST)
    assert not plan["fits"] and plan["memory"]["margin"] < 0
    s = plan["suggestion"]
    assert s["cluster"]["world_size"] > 64 and s["margin_bytes"] >= 0  # 1.6T needs more GPUs

    # larger ep or FSDP on the same GPUs
    cluster = ClusterConfig(world_size=8, gpu_memory_gb=24, reserved_gb=0)
    base = replace(model_cfg("switch_base"), seq_len=512)
    cfg = train_cfg(
        model=base, router=RouterConfig(kind="switch"), trainer={"global_batch_size": 8}
    )
    plan = make_plan(cfg, cluster, FAST)
    assert not plan["fits"]
    changes = plan["suggestion"]["changes"]
    assert plan["suggestion"]["cluster"]["world_size"] == 8
    assert changes.get("parallel.ep", 1) > 1 or changes.get("parallel.fsdp")

    # FSDP for a dense-heavy model: ep does not help, sharding the dense state does
    dense = replace(base, moe_every=0, d_model=4096, n_heads=32, d_ff=16384, n_layers=12)
    cluster = ClusterConfig(world_size=8, gpu_memory_gb=40)
    cfg = train_cfg(
        model=dense, router=RouterConfig(kind="switch"), trainer={"global_batch_size": 8}
    )
    plan = make_plan(cfg, cluster, FAST)
    assert not plan["fits"] and plan["suggestion"]["changes"].get("parallel.fsdp")
    assert "parallel.fsdp=true" in plan["suggestion"]["options"]


def test_compare_routers_rows_follow_the_router_classes() -> None:
    """One row per comparable kind: the tree (its depth fixes the experts) is left out, SAM gets
    one group per ep rank, prototypes drop out when the expert count is odd."""
    cluster = ClusterConfig(world_size=8)
    router = RouterConfig(kind="switch")
    cfg = train_cfg(router=router, parallel={"ep": 4})

    def pc_fn(r):
        return count_params(SMALL, r)

    rows = {r["router"]: r for r in compare_routers(pc_fn, cfg, cluster)}
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
    odd_cfg = train_cfg(
        model=odd, router=router, parallel={"ep": 3}, trainer={"global_batch_size": 9}
    )
    names = [
        r["router"]
        for r in compare_routers(
            lambda r: count_params(odd, r), odd_cfg, replace(cluster, world_size=9)
        )
    ]
    assert "prototype top_k=2" not in names and "sam top_k=2 num_groups=3" in names
