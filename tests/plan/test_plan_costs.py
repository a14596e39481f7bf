"""plan/costs.py: memory, activation and all-to-all arithmetic by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_train.model import LEGACY_BODY, MoETransformer
from moe_train.plan import (
    ClusterConfig,
    a2a,
    activation_bytes,
    count_params,
    distinct_ranks,
    estimate_step,
    memory,
)
from moe_train.plan.costs import model_flops_per_token
from moe_train.routing import RouterConfig
from tests.helpers.plan import SMALL, train_cfg


def test_modern_body_params_and_attention_by_hand() -> None:
    """RMSNorm (a weight), RoPE (no table), SwiGLU (3 matrices), GQA with head_dim != d / h and
    qk-norm: the planner's count by hand, equal to the model's; attention activations and FLOPs
    over the query width."""
    model = replace(SMALL, n_kv_heads=1, head_dim=12, qk_norm="head", activation="swiglu")
    router = RouterConfig(kind="topk", top_k=2)
    pc = count_params(model, router)
    d, V, f, E, L = 16, 50, 24, 8, 3
    q, kv = 2 * 12, 1 * 12  # 2 query heads, 1 key/value head, of 12
    attention = L * (d * (q + 2 * kv) + q * d)
    norms = (2 * L + 1) * d + L * 2 * 12  # RMSNorm weights + q_norm and k_norm [12] per layer
    dense = V * d + attention + norms + 2 * (3 * d * f) + d * E
    assert (pc.attention, pc.norms, pc.lookup_only) == (attention, norms, 0)
    assert (pc.dense, pc.experts) == (dense, 1 * E * 3 * d * f)
    built = MoETransformer(replace(model), router).num_params()
    assert (built["dense"], built["expert"]) == (pc.dense, pc.experts)

    b, s, a = 2, 16, 2
    cfg = train_cfg(model=model, router=router, trainer={"global_batch_size": 16, "micro_batch_size": 2},
                    parallel={"ep": 4})  # fmt: skip
    acts = activation_bytes(cfg, ClusterConfig(world_size=8))
    attn = 3 * s * b * d + 4 * s * b * (q + kv) + 5 * a * s * s * b
    dense_layer = attn + 4 * s * b * d + 3 * s * b * d + 8 * s * b * f
    assert acts["dense_layer"] == dense_layer
    n = pc.active(2)  # no position table to leave out
    assert model_flops_per_token(model, router) == 6 * n + 12 * s * q * L


def test_memory_terms_by_hand() -> None:
    model = replace(SMALL, **LEGACY_BODY)  # GPT-2's body; 3 layers, layer 1 is MoE (moe_every=2)
    router = RouterConfig(kind="topk", top_k=2)
    pc = count_params(model, router)
    d, V, s, f, E = 16, 50, 16, 24, 8
    dense = V * d + s * d + 3 * (4 * d * d + 4 * d) + 2 * d + 2 * (2 * d * f) + d * E
    expert = 1 * E * 2 * d * f
    assert (pc.dense, pc.experts) == (dense, expert)

    base = ClusterConfig(world_size=8, gpu_memory_gb=1, reserved_gb=0)
    micro2 = {"global_batch_size": 16, "micro_batch_size": 2}  # 8 GPUs x 2 sequences (s = 16)

    def cfg(**sections):
        return train_cfg(model=model, router=router, trainer={**micro2, **sections.pop("trainer", {})},
                         parallel={"ep": 4, **sections.pop("parallel", {})}, **sections)  # fmt: skip

    # the trainer's state: fp32 weights and gradients, AdamW's two fp32 moments; FSDP shards
    # dense over the world (8) and experts over the world/ep ranks holding them (2)
    for fsdp, div in ((False, (1, 1)), (True, (8, 2))):
        m = memory(pc, cfg(parallel={"fsdp": fsdp}), base)
        held = dense / div[0] + expert / 4 / div[1]
        assert m["weights"] == pytest.approx(4 * held) and m["gradients"] == m["weights"]
        assert m["optimizer"] == pytest.approx(8 * held)
    fp32 = memory(pc, cfg(trainer={"precision": "fp32"}), base)
    assert fp32["transient_weights_and_gradients"] == 0  # no autocast copies in fp32
    ada = memory(pc, cfg(optim={"name": "adafactor"}), base)
    assert ada["optimizer"] == 0 and ada["weights"] == 4 * (dense + expert / 4)

    # activations: Korthikanti per layer + MoE terms + head, b=2, s=16, a=2
    b, a, k = 2, 2, 2
    sbd = s * b * d
    attn_norm = 11 * sbd + 5 * a * s * s * b + 4 * sbd
    dense_layer = attn_norm + 3 * sbd + 4 * s * b * f
    moe_layer = attn_norm + 3 * sbd + 4 * sbd + 8 * s * b * E + k * s * b * (4 * d + 4 * f)
    head = 6 * s * b * V + 2 * sbd
    acts = activation_bytes(cfg(), base)
    assert acts["no_checkpointing"] == 2 * dense_layer + moe_layer + head
    assert acts["checkpointing"] == 3 * 2 * sbd + max(dense_layer, moe_layer) + head
    assert acts["moe_checkpointing"] == acts["no_checkpointing"]  # one MoE layer: recomputed
    flash = activation_bytes(cfg(), replace(base, flash_attention=True))
    assert acts["no_checkpointing"] - flash["no_checkpointing"] == 3 * 5 * a * s * s * b
    # Korthikanti's 34sbh + 5as^2b for a dense layer with d_ff = 4d
    dense4 = replace(model, d_ff=4 * d, moe_every=0)
    one = activation_bytes(replace(cfg(), model=dense4), base)["dense_layer"]
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
    c = ClusterConfig(world_size=8)
    trainer = {"global_batch_size": 8 * 2 * 3, "micro_batch_size": 2}  # micro 2 x accum 3, s 16
    cfg = train_cfg(model=model, router=r, parallel={"ep": 8}, trainer=trainer)
    tokens, remote = 32, 7 / 8
    # 4 row transfers (dispatch+combine, fwd+bwd) of d*2 bytes + 16 B metadata per remote slot
    # (12 B packed (row, expert, weight) forward, 4 B weight gradient backward)
    per_layer = 4 * tokens * remote * 16 * 2 + tokens * remote * (12 + 4)
    assert a2a(pc, cfg, c)["bytes_per_gpu_per_step"] == pytest.approx(per_layer * 1 * 3)
    full = replace(cfg, trainer=replace(cfg.trainer, activation_checkpointing="full"))
    ck = a2a(pc, full, c)["bytes_per_gpu_per_step"]
    # full recompute sends the forward's metadata twice
    assert ck == pytest.approx((6 * tokens * remote * 32 + tokens * remote * (24 + 4)) * 3)


def test_distinct_ranks_of_sam_groups_spanning_ranks_and_expert_choice() -> None:
    """SAM with 2 groups of 32 over 8 ranks: top-2 inside a group of 4 ranks (hypergeometric);
    expert choice with c = 2: each of a rank's 8 experts takes a token w.p. 2/64."""
    sam = RouterConfig(kind="sam", top_k=2, num_groups=2)
    assert distinct_ranks(sam, 64, 8) == pytest.approx(4 * (1 - (24 / 32) * (23 / 31)))
    ec = RouterConfig(kind="expert_choice", capacity_factor=2.0)
    assert distinct_ranks(ec, 64, 8) == pytest.approx(8 * (1 - (1 - 2 / 64) ** 8))


def test_estimate_step_is_the_sum_of_its_terms() -> None:
    router = RouterConfig(kind="topk", top_k=2)
    pc = count_params(SMALL, router)
    c = ClusterConfig(world_size=8)
    cfg = train_cfg(router=router, parallel={"ep": 4})
    est = estimate_step(pc, cfg, c)
    assert est["memory"] == memory(pc, cfg, c)
    assert est["a2a"] == a2a(pc, cfg, c)
    assert est["comm_compute_ratio"] == est["a2a"]["seconds"] / est["compute"]["seconds"]
