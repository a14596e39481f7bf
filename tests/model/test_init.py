"""Layout-invariant initialisation (moe_train.init): the model built on `meta` and materialised
equals the model built in place; a rank of any ep layout holds exactly the matching slices of the
1-process experts; an MoE layer built alone equals the same layer in a model; a model built on
a real device draws every parameter once, by its module's rule, and nothing from the global RNG;
on 4 gloo ranks with FSDP each rank materialises only its shards, and the gathered model equals
the 1-process one."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from moe_train.experts import ExpertBank
from moe_train.init import init_parameters, materialize, rule_owner
from moe_train.layer import MoELayer
from moe_train.model import (
    LEGACY_BODY,
    Embedding,
    LayerNorm,
    Linear,
    ModelConfig,
    MoETransformer,
    RMSNorm,
    rope_tables,
)
from moe_train.parallel import ExpertShard, is_expert_param
from moe_train.routing import Router, RouterConfig
from tests.helpers.distributed import run_ranks

# the modern body with every parameter it can have (GQA, qk-norm); GPT2 the legacy body
TINY = {"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "qk_norm": "head", "d_ff": 128, "num_experts": 4, "moe_every": 1}  # fmt: skip
GPT2 = {**TINY, **LEGACY_BODY}


def build(
    shard: ExpertShard | None = None, meta: bool = False, seed: int = 7, body: dict = TINY
) -> MoETransformer:
    cfg, router = ModelConfig(**body), RouterConfig(kind="sam", num_groups=2)
    if not meta:
        return MoETransformer(cfg, router, seed=seed, shard=shard)
    with torch.device("meta"):
        model = MoETransformer(cfg, router, seed=seed, shard=shard)
    return materialize(model, torch.device("cpu"), seed)


@pytest.mark.parametrize("body", [TINY, GPT2], ids=["modern", "gpt2"])
def test_meta_then_materialize_equals_the_model_built_in_place(body):
    ref, model = build(body=body), build(meta=True, body=body)
    assert model.head.weight is model.tok_emb.weight  # the tie survives to_empty
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(64))
    assert not torch.equal(
        build(seed=8, body=body).blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight
    )
    x = torch.randint(0, 256, (2, 64))
    assert torch.equal(model(x)[0], ref(x)[0])  # buffers too (RoPE's tables)


def test_rope_tables_are_recomputed_on_materialize_and_never_saved():
    with torch.device("meta"):
        model = MoETransformer(ModelConfig(**TINY), RouterConfig(), seed=7)
    assert model.rope is not None and model.rope.cos.is_meta
    real_empty = torch.empty_like

    def nan_empty(t, *a, **k):  # what uninitialised memory may hold
        out = real_empty(t, *a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.empty_like = nan_empty  # to_empty allocates through empty_like
    try:
        materialize(model, torch.device("cpu"), seed=7)
    finally:
        torch.empty_like = real_empty
    cos, sin = rope_tables(64, 16, 10000.0)  # [64, 16]: 4 heads of 16
    assert torch.equal(model.rope.cos, cos) and torch.equal(model.rope.sin, sin)
    assert not any("rope" in k for k in model.state_dict())  # non-persistent buffers


@pytest.mark.parametrize("ep", [2, 4])
def test_every_ep_rank_holds_the_slices_of_the_single_process_experts(ep):
    ref = dict(build().named_parameters())
    for rank in range(ep):
        model = build(ExpertShard(ep, rank), meta=True)
        for name, p in model.named_parameters():
            want = ref[name]
            if name.endswith(("w_in", "w_out")):
                n = p.shape[0]
                want = want[rank * n : (rank + 1) * n]
            assert torch.equal(p, want), (ep, rank, name)


def layer_alone(router: RouterConfig, layer_id: int, seed: int, shard=None) -> MoELayer:
    """The MoE layer of block `layer_id` of build()'s model, built on its own."""
    cfg = ModelConfig(**TINY)
    return MoELayer(
        cfg.d_model, cfg.expert_d_ff or cfg.d_ff, router.num_experts_for(cfg.num_experts),
        router=router, activation=cfg.activation, shard=shard, layer_id=layer_id, seed=seed,
        init_std=cfg.init_std, out_std=cfg.output_init_std,
    )  # fmt: skip


@pytest.mark.parametrize("shard", [None, ExpertShard(2, 1)], ids=["ep1", "ep2-rank1"])
@pytest.mark.parametrize("kind", ["sam", "topk"])  # sam: a gate with a bias
def test_a_layer_built_alone_equals_the_same_layer_in_a_model(kind, shard):
    router = RouterConfig(kind=kind, num_groups=2)
    model = MoETransformer(ModelConfig(**TINY), router, seed=7, shard=shard)
    for layer_id, block in enumerate(model.blocks):
        inside = dict(block.ffn.named_parameters())
        alone = dict(layer_alone(router, layer_id, seed=7, shard=shard).named_parameters())
        assert inside.keys() == alone.keys()
        for name, p in alone.items():
            assert torch.equal(p, inside[name]), (layer_id, name)
    # the key is (seed, layer id, name): another layer id or seed gives other weights
    other_layer, other_seed = layer_alone(router, 0, 7, shard), layer_alone(router, 1, 8, shard)
    for other in (other_layer, other_seed):
        assert not torch.equal(other.experts.w_in, model.blocks[1].ffn.experts.w_in)
        assert not torch.equal(other.router.gate.weight, model.blocks[1].ffn.router.gate.weight)


def test_a_layer_ignores_the_global_rng_and_its_experts_are_keyed_by_global_id():
    router = RouterConfig(kind="switch")
    torch.manual_seed(1)
    full = layer_alone(router, 1, seed=3)
    torch.manual_seed(2)
    half = layer_alone(router, 1, seed=3, shard=ExpertShard(2, 1))
    assert torch.equal(half.experts.w_in, full.experts.w_in[2:])
    assert torch.equal(half.experts.w_out, full.experts.w_out[2:])
    assert torch.equal(half.router.gate.weight, full.router.gate.weight)
    assert not torch.equal(full.experts.w_in[0], full.experts.w_in[1])


RULE_CLASSES = (Linear, Embedding, LayerNorm, RMSNorm, Router, ExpertBank)


@pytest.fixture
def rule_calls(monkeypatch) -> Counter:
    """(id(module), parameter name) -> calls of that module's init_value."""
    calls: Counter = Counter()
    for cls in RULE_CLASSES:

        def counted(self, name, shape, generator=None, _rule=cls.init_value):
            calls[(id(self), name)] += 1
            return _rule(self, name, shape, generator)

        monkeypatch.setattr(cls, "init_value", counted)
    return calls


def expected_draws(root: nn.Module) -> Counter:
    """One draw per dense parameter, one per local expert of an expert parameter."""
    want: Counter = Counter()
    for fqn, p in root.named_parameters():
        owner, name = rule_owner(root, fqn)
        want[(id(owner), name)] += p.shape[0] if is_expert_param(p) else 1
    return want


@pytest.mark.parametrize("tie", [True, False])
def test_a_model_on_a_real_device_draws_each_parameter_exactly_once(rule_calls, tie):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = MoETransformer(
        ModelConfig(**TINY, tie_embeddings=tie), RouterConfig(kind="sam", num_groups=2), seed=7
    )
    # no module's own init ran on real memory: those draw from the global RNG
    assert torch.equal(state, torch.get_rng_state())
    assert rule_calls == expected_draws(model)
    assert sum(rule_calls.values()) == sum(
        p.shape[0] if is_expert_param(p) else 1 for p in model.parameters()
    )
    layer_calls = sum(rule_calls.values())
    alone = layer_alone(RouterConfig(kind="topk"), 1, seed=7)  # a layer alone: the same
    assert torch.equal(state, torch.get_rng_state())
    assert sum(rule_calls.values()) - layer_calls == 1 + 2 * 4  # the gate, 4 experts x 2
    assert all(rule_calls[k] == n for k, n in expected_draws(alone).items())


def test_a_parameter_without_an_init_rule_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = LayerNorm(4)
            self.lin = nn.Linear(4, 4)  # torch's own class: no init_value

    with pytest.raises(TypeError, match=r"'lin.weight'.*init_value.*give Linear "):
        init_parameters(Odd(), seed=0)


def _fsdp_ranks(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist

    from moe_train.parallel import ParallelConfig, ParallelDims, build_process_groups, parallelize

    dist.init_process_group("gloo")
    dims = ParallelDims(world_size=world, ep=2, rank=rank)
    groups = build_process_groups(dims, backend="gloo", timeout_s=60, device_type="cpu")
    with torch.device("meta"):
        model = MoETransformer(
            ModelConfig(**TINY), RouterConfig(kind="sam", num_groups=2), seed=7,
            shard=dims.expert_shard,
        )  # fmt: skip
    parallelize(model, dims, groups, ParallelConfig(ep=2, fsdp=True),
                materialize=lambda m: materialize(m, torch.device("cpu"), 7))  # fmt: skip
    ref = dict(build().named_parameters())
    worst, local, full = 0.0, 0, 0
    for name, p in model.named_parameters():
        whole = p.full_tensor()
        want = ref[name]
        if name.endswith(("w_in", "w_out")):
            n = whole.shape[0]
            want = want[dims.ep_rank * n : (dims.ep_rank + 1) * n]
        worst = max(worst, float((whole - want).abs().max().detach()))
        local += p.to_local().numel()
        full += want.numel()
    del model, groups
    return {"worst": worst, "local": local, "full": full}


@pytest.mark.distributed
def test_fsdp_ranks_initialise_only_their_shards_to_the_single_process_model():
    out = run_ranks(_fsdp_ranks, 4, timeout=180)
    assert all(r["worst"] == 0.0 for r in out)
    whole_model = sum(p.numel() for p in build().parameters())
    assert sum(r["local"] for r in out) == whole_model  # every element on exactly one rank
    assert all(r["local"] < r["full"] / 1.9 for r in out)
