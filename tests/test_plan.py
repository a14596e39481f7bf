"""The capacity planner: counts against the real module, published totals, memory arithmetic, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe_train.model import ModelConfig, MoETransformer
from moe_train.plan import (
    ClusterConfig,
    EncDecConfig,
    GiB,
    PlanOptions,
    a2a,
    activation_bytes,
    count_params,
    distinct_ranks,
    make_plan,
    memory,
    meta_count,
    one_rank_build,
)
from moe_train.routing import RouterConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = PlanOptions(meta_check=False, compare_routers=False)


def model_cfg(name: str) -> ModelConfig:
    node = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


SMALL = ModelConfig(
    vocab_size=50, seq_len=16, d_model=16, n_layers=3, n_heads=2, d_ff=24, num_experts=8
)
ROUTERS = [
    RouterConfig(kind="switch"),
    RouterConfig(kind="topk", top_k=2),
    RouterConfig(kind="prototype", top_k=2),
    RouterConfig(kind="sam", top_k=2, num_groups=2),  # gate with bias
    RouterConfig(kind="expert_choice", capacity_factor=2.0),
    RouterConfig(kind="tree", tree_depth=2),  # 2 gate units, 7 node experts
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r.kind)
@pytest.mark.parametrize(
    "model",
    [
        SMALL,
        replace(SMALL, activation="swiglu", tie_embeddings=False, moe_every=1),
        replace(SMALL, expert_d_ff=40, moe_every=3),
    ],
    ids=["gelu", "swiglu-untied-all-moe", "expert_d_ff"],
)
def test_count_equals_module_exactly(model: ModelConfig, router: RouterConfig) -> None:
    torch.manual_seed(0)
    module = MoETransformer(replace(model), replace(router))
    real = module.num_params()
    pc = count_params(model, router)
    assert (pc.dense, pc.experts, pc.total) == (real["dense"], real["expert"], real["total"])
    # the same as the sum over the module's (deduplicated) parameters
    assert pc.total == sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def test_one_rank_build_holds_its_share_of_experts() -> None:
    """Without a process group, rank 1 of ep=4 holds E/4 experts per layer, dense replicated."""
    pc = count_params(SMALL, RouterConfig())
    with one_rank_build(4, rank=1) as group:
        module = MoETransformer(replace(SMALL), RouterConfig(), ep_group=group)
    counts = module.num_params()
    assert counts["dense"] == pc.dense and counts["expert"] == pc.experts // 4
    assert module.moe_layers()[0].experts.first_expert == 2
    # the patch is scoped: a plain build still gets all experts
    assert MoETransformer(replace(SMALL), RouterConfig()).num_params()["expert"] == pc.experts


@pytest.mark.parametrize(
    "name,router,ep",
    [
        ("switch_c", RouterConfig(kind="switch"), 2048),
        ("m6t_1t", RouterConfig(kind="prototype", top_k=2), 480),
        ("switch_xxl", RouterConfig(kind="switch"), 128),
    ],
)
def test_meta_count_equals_analytic_for_big_models(
    name: str, router: RouterConfig, ep: int
) -> None:
    model = model_cfg(name)
    pc = count_params(model, router)
    mc = meta_count(model, router, ep)
    assert mc["dense"] == pc.dense
    assert mc["expert"] == pc.experts // ep
    assert pc.total > 3e11


@pytest.mark.parametrize(
    "name,published,encdec",
    [
        ("switch_c", 1571e9, EncDecConfig(d_kv=64)),
        ("switch_xxl", 395e9, EncDecConfig()),
    ],
)
def test_published_totals_within_one_percent(
    name: str, published: float, encdec: EncDecConfig
) -> None:
    model = model_cfg(name)
    enc = count_params(model, RouterConfig(kind="switch"), "encoder_decoder", encdec)
    assert abs(enc.total / published - 1) < 0.01
    dec = count_params(model, RouterConfig(kind="switch"))  # our decoder-only equivalent
    assert abs(dec.total / published - 1) < 0.01
    assert enc.experts == dec.experts  # same experts; only attention/norm/embedding terms differ


def test_m6t_is_about_a_trillion() -> None:
    pc = count_params(model_cfg("m6t_1t"), RouterConfig(kind="prototype", top_k=2))
    assert 1.0e12 <= pc.total < 1.01e12


def test_memory_terms_by_hand() -> None:
    model = SMALL  # 3 layers, layer 1 is MoE (moe_every=2)
    router = RouterConfig(kind="topk", top_k=2)
    pc = count_params(model, router)
    d, V, s, f, E = 16, 50, 16, 24, 8
    dense = V * d + s * d + 3 * (4 * d * d + 4 * d) + 2 * d + 2 * (2 * d * f) + d * E
    expert = 1 * E * 2 * d * f
    assert (pc.dense, pc.experts) == (dense, expert)

    base = ClusterConfig(
        world_size=8, ep=4, micro_batch_size=2, seq_len=16, gpu_memory_gb=1, reserved_gb=0
    )
    for zero, grad_div, opt_div in ((0, (1, 1), (1, 1)), (1, (1, 1), (8, 2)), (2, (8, 2), (8, 2))):
        m = memory(pc, model, router, replace(base, zero_stage=zero))
        assert m["weights"] == 2 * (dense + expert / 4)
        assert m["gradients"] == pytest.approx(
            2 * dense / grad_div[0] + 2 * expert / 4 / grad_div[1]
        )
        assert m["optimizer"] == pytest.approx(
            12 * dense / opt_div[0] + 12 * expert / 4 / opt_div[1]
        )

    # activations: Korthikanti per layer + MoE terms + head, b=2, s=16, a=2
    b, a, k = 2, 2, 2
    sbd = s * b * d
    attn_norm = 11 * sbd + 5 * a * s * s * b + 4 * sbd
    dense_layer = attn_norm + 3 * sbd + 4 * s * b * f
    moe_layer = attn_norm + 3 * sbd + 4 * sbd + 8 * s * b * E + k * s * b * (4 * d + 4 * f)
    head = 6 * s * b * V + 2 * sbd
    acts = activation_bytes(model, router, base)
    assert acts["no_checkpointing"] == 2 * dense_layer + moe_layer + head
    assert acts["checkpointing"] == 3 * 2 * sbd + max(dense_layer, moe_layer) + head
    flash = activation_bytes(model, router, replace(base, flash_attention=True))
    assert acts["no_checkpointing"] - flash["no_checkpointing"] == 3 * 5 * a * s * s * b
    # Korthikanti's 34sbh + 5as^2b for a dense layer with d_ff = 4d
    dense4 = replace(model, d_ff=4 * d, moe_every=0)
    one = activation_bytes(dense4, router, base)["dense_layer"]
    assert one == 34 * sbd + 5 * a * s * s * b


def test_a2a_sam_one_copy_topk_distinct_ranks() -> None:
    E, ep = 64, 8
    assert distinct_ranks(RouterConfig(kind="switch"), E, ep) == 1
    assert distinct_ranks(RouterConfig(kind="sam", top_k=4, num_groups=8), E, ep) == 1
    # top-2 of 64 without replacement, 8 experts per rank: P(same rank) = 7/63
    assert distinct_ranks(RouterConfig(kind="topk", top_k=2), E, ep) == pytest.approx(2 - 7 / 63)
    assert distinct_ranks(RouterConfig(kind="prototype", top_k=2), E, ep) == pytest.approx(2)
    assert distinct_ranks(RouterConfig(kind="topk", top_k=2), E, 1) == 1

    model = replace(SMALL, d_model=16, num_experts=E)
    r = RouterConfig(kind="switch")
    pc = count_params(model, r)
    c = ClusterConfig(world_size=8, ep=8, micro_batch_size=2, seq_len=16, grad_accum=3)
    tokens, remote = 32, 7 / 8
    # 4 row transfers (dispatch+combine, fwd+bwd) of d*2 bytes + 24 B metadata per remote slot
    per_layer = 4 * tokens * remote * 16 * 2 + tokens * remote * (20 + 4)
    assert a2a(pc, model, r, c)["bytes_per_gpu_per_step"] == pytest.approx(per_layer * 1 * 3)
    ck = a2a(pc, model, r, replace(c, activation_checkpointing=True))["bytes_per_gpu_per_step"]
    assert ck == pytest.approx((6 * tokens * remote * 32 + tokens * remote * (40 + 4)) * 3)


def test_impossible_config_says_what_fits() -> None:
    model = model_cfg("switch_c")
    cluster = ClusterConfig(world_size=64, gpu_memory_gb=80, seq_len=512)
    plan = make_plan(model, RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"] and plan["memory"]["margin"] < 0
    s = plan["suggestion"]
    assert s["cluster"]["world_size"] > 64 and s["margin_bytes"] >= 0  # 1.6T needs more GPUs

    # larger ep on the same GPUs
    cluster = ClusterConfig(world_size=8, ep=1, gpu_memory_gb=24, reserved_gb=0, seq_len=512)
    plan = make_plan(model_cfg("switch_base"), RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"]
    assert (
        plan["suggestion"]["changes"]["ep"] > 1 and plan["suggestion"]["cluster"]["world_size"] == 8
    )

    # ZeRO for a dense-heavy model: ep does not help, sharding the dense optimizer state does
    dense = replace(
        model_cfg("switch_base"), moe_every=0, d_model=4096, n_heads=32, d_ff=16384, n_layers=12
    )
    cluster = ClusterConfig(world_size=8, ep=1, zero_stage=0, gpu_memory_gb=40, seq_len=512)
    plan = make_plan(dense, RouterConfig(kind="switch"), cluster, FAST)
    assert not plan["fits"] and plan["suggestion"]["changes"].get("zero_stage", 0) >= 1


def test_bad_cluster_field_is_named() -> None:
    with pytest.raises(ValueError, match="cluster.ep"):
        make_plan(SMALL, RouterConfig(), ClusterConfig(world_size=8, ep=3), FAST)


def test_cli_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_train.plan",
            "model=tiny",
            "router=sam",
            "router.num_groups=2",
            "cluster.world_size=4",
            "cluster.ep=2",
            "plan.json=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    plan = json.loads(out)
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

    bad = subprocess.run(
        [sys.executable, "-m", "moe_train.plan", "model=tiny", "cluster.ep=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "cluster.ep" in bad.stderr
