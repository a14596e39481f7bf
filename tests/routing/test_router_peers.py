"""The current generation's options against the peers' own code, fp32, identical weights:
sigmoid + balancing bias + group-limited + route_scale + a shared expert = transformers'
DeepseekV3MoE; a gated shared expert = Qwen2MoeSparseMoeBlock; normalize_topk=false =
OlmoeSparseMoeBlock(norm_topk_prob=false). The MoE block alone (no attention)."""

from __future__ import annotations

import pytest
import torch

from moe_train.layer import MoELayer
from moe_train.routing import RouterConfig

transformers = pytest.importorskip("transformers")

D, F, E = 16, 8, 8


def peer_config(cls_name: str, **fields):
    cls = getattr(transformers, cls_name)
    return cls(hidden_size=D, hidden_act="silu", **fields)


@torch.no_grad()
def copy_experts(ours: MoELayer, gate_up: torch.Tensor, down: torch.Tensor, gate_w) -> None:
    """HF stacked experts (gate_up_proj [E, 2F, D], down_proj [E, D, F]) into our bank
    (w_in [E, D, 2F] gate then up, w_out [E, F, D]) and the router weight [E, D]."""
    ours.experts.w_in.copy_(gate_up.transpose(1, 2))
    ours.experts.w_out.copy_(down.transpose(1, 2))
    ours.router.gate.weight.copy_(gate_w)


@torch.no_grad()
def copy_mlp(ours_shared, mlp) -> None:
    """An HF gated MLP (gate_proj, up_proj [F, D], down_proj [D, F]) into SharedExperts."""
    ours_shared.w_in.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    ours_shared.w_out.copy_(mlp.down_proj.weight)


def layer(router: RouterConfig, **shared) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, F, E, router=router, activation="swiglu", **shared)


def randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


def test_sigmoid_bias_groups_scale_and_shared_expert_equal_deepseek_v3_moe():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = peer_config(
        "DeepseekV3Config",
        n_routed_experts=E,
        num_experts_per_tok=2,
        moe_intermediate_size=F,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    peer = DeepseekV3MoE(cfg).float()
    randomise(peer)
    bias = torch.linspace(-0.3, 0.3, E)  # a bias that changes choices
    peer.gate.e_score_correction_bias.copy_(bias)
    router = RouterConfig(
        kind="topk",
        top_k=2,
        score="sigmoid",
        num_groups=4,
        topk_groups=2,
        route_scale=2.5,
        bias_update_rate=1e-3,
        capacity_factor=None,
        random_routing=False,
    )
    ours = layer(router, shared_experts=1, shared_d_ff=F)
    copy_experts(ours, peer.experts.gate_up_proj, peer.experts.down_proj, peer.gate.weight)
    copy_mlp(ours.shared, peer.shared_experts)
    ours.router.score_bias.copy_(bias)
    x = torch.randn(3, 10, D)
    want = peer(x)
    got, _ = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the bias changed choices here (so the test would see it ignored), and the groups limited
    ours.router.score_bias.zero_()
    assert not torch.allclose(ours(x)[0], want, atol=1e-4)


def test_gated_shared_expert_equals_qwen2_moe_sparse_block():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = peer_config(
        "Qwen2MoeConfig",
        num_experts=E,
        num_experts_per_tok=2,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=2 * F,
        norm_topk_prob=True,
    )
    peer = Qwen2MoeSparseMoeBlock(cfg).float()
    randomise(peer)
    router = RouterConfig(kind="topk", top_k=2, capacity_factor=None, random_routing=False)
    ours = layer(router, shared_experts=2, shared_d_ff=F, shared_gate=True)
    copy_experts(ours, peer.experts.gate_up_proj, peer.experts.down_proj, peer.gate.weight)
    copy_mlp(ours.shared, peer.shared_expert)
    with torch.no_grad():
        ours.shared.w_gate.copy_(peer.shared_expert_gate.weight)
    x = torch.randn(2, 12, D)
    torch.testing.assert_close(ours(x)[0], peer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_normalize_topk_equals_olmoe_norm_topk_prob(normalize):
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = peer_config(
        "OlmoeConfig", num_experts=E, num_experts_per_tok=2, intermediate_size=F,
        norm_topk_prob=normalize,
    )  # fmt: skip
    peer = OlmoeSparseMoeBlock(cfg).float()
    randomise(peer)
    router = RouterConfig(
        kind="topk", top_k=2, capacity_factor=None, random_routing=False,
        normalize_topk=normalize,
    )  # fmt: skip
    ours = layer(router)
    copy_experts(ours, peer.experts.gate_up_proj, peer.experts.down_proj, peer.gate.weight)
    x = torch.randn(2, 12, D)
    torch.testing.assert_close(ours(x)[0], peer(x), rtol=1e-5, atol=1e-6)
