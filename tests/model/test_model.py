"""The decoder-only MoE LM: shapes, aux losses, learning, dense mode, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_train import ModelConfig, MoELayer, MoETransformer, RouteKey, RouterConfig
from tests.helpers.distributed import forbid_torch_distributed
from tests.helpers.routing import KINDS


def tiny(moe_every=1, **kw):
    base = dict(
        vocab_size=32,
        seq_len=16,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=48,
        num_experts=4,
        moe_every=moe_every,
    )
    base.update(kw)
    return ModelConfig(**base)


def router(kind, **kw):
    base = dict(
        kind=kind, top_k=2, num_groups=2, capacity_factor=2.0 if kind == "expert_choice" else 1.25
    )
    base.update(kw)
    return RouterConfig(**base)


def batch(B=4, T=16, V=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T + 1), generator=g)


def capture_layer_losses(model):
    seen = []
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_aux_is_sum_of_layer_losses(kind):
    torch.manual_seed(0)
    model = MoETransformer(tiny(moe_every=1), router(kind))
    assert len(model.moe_layers()) == 2
    seen = capture_layer_losses(model)
    idx = batch()[:, :-1]
    logits, aux = model(idx, RouteKey(1))
    assert logits.shape == (4, 16, 32)
    assert aux.dim() == 0
    assert len(seen) == 2
    want = sum(v for losses in seen for v in losses.values())
    torch.testing.assert_close(aux, want)
    for name in model.last_aux:
        torch.testing.assert_close(model.last_aux[name], sum(losses[name] for losses in seen))
    assert aux > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_lower_the_loss(kind):
    torch.manual_seed(0)
    model = MoETransformer(tiny(moe_every=2), router(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batch()
    idx, tgt = data[:, :-1], data[:, 1:]
    losses = []
    for step in range(12):
        logits, aux = model(idx, RouteKey(step))
        ce = F.cross_entropy(logits.reshape(-1, 32), tgt.reshape(-1))
        losses.append(ce.item())
        opt.zero_grad()
        (ce + aux).backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


def test_dense_model_has_no_moe_layers():
    torch.manual_seed(0)
    model = MoETransformer(tiny(moe_every=0), router("switch"))
    assert model.moe_layers() == []
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert model.num_params()["expert"] == 0
    logits, aux = model(batch()[:, :-1])
    assert logits.shape == (4, 16, 32) and float(aux) == 0.0


def test_moe_every_places_moe_layers():
    torch.manual_seed(0)
    model = MoETransformer(tiny(moe_every=2, n_layers=4), router("switch"))
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, True, False, True]
    assert model.num_params()["expert"] > 0


def test_same_seed_same_model_and_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = MoETransformer(tiny(), router("topk", jitter_eps=0.1))
        outs.append(model(batch()[:, :-1], RouteKey(4)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("kind", ["switch", "sam", "tree"])
def test_bf16_autocast_runs_and_router_stays_float32(kind):
    torch.manual_seed(0)
    model = MoETransformer(tiny(), router(kind))
    seen = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    data = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(data[:, :-1], RouteKey(0))
        ce = F.cross_entropy(logits.float().reshape(-1, 32), data[:, 1:].reshape(-1))
    assert logits.dtype == torch.bfloat16  # autocast really was on
    (ce + aux).backward()
    assert torch.isfinite(ce) and torch.isfinite(aux)
    assert len(seen) == 2
    for a in seen:
        assert a.weight.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in a.losses.values())
    for layer in model.moe_layers():
        assert layer.router.gate.weight.dtype == torch.float32
        assert torch.isfinite(layer.router.gate.weight.grad).all()


def test_too_long_sequence_and_bad_config_raise():
    torch.manual_seed(0)
    model = MoETransformer(tiny(), router("switch"))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="model.n_heads"):
        MoETransformer(tiny(n_heads=5), router("switch"))
    with pytest.raises(ValueError, match="router.top_k"):
        MoETransformer(tiny(), router("topk", top_k=5))


@pytest.mark.parametrize("kind", ["switch", "topk", "expert_choice"])
def test_half_batch_with_token_offset_matches_the_full_batch(kind):
    """Data-parallel split: the second half, run alone at its global offset, gives the same
    logits as in the whole batch (routing groups per sequence, noise keyed by global position)."""
    torch.manual_seed(0)
    model = MoETransformer(
        tiny(),
        router(kind, jitter_eps=0.2, capacity_factor=0.5 if kind != "expert_choice" else 1.0),
    )
    model.train()
    idx = batch()[:, :-1]
    full, _ = model(idx, RouteKey(8))
    half, _ = model(idx[2:], RouteKey(8, 2 * 16))
    torch.testing.assert_close(half, full[2:], atol=1e-5, rtol=1e-5)
    wrong, _ = model(idx[2:], RouteKey(8, 0))
    assert not torch.allclose(wrong, full[2:], atol=1e-5, rtol=1e-5)


def test_one_route_key_reaches_every_router_mixed_with_its_layer_id_once():
    model = MoETransformer(tiny(n_layers=3), router("topk", jitter_eps=0.1)).train()
    keys = []
    for layer in model.moe_layers():
        layer.router.register_forward_pre_hook(lambda mod, args: keys.append(args[1]))
    model(batch()[:, :-1], RouteKey(8, 32))
    want = [RouteKey(8, 32).for_layer(layer_id) for layer_id in range(3)]
    assert keys == want and len(set(keys)) == 3  # every layer its own noise, same offset
    assert RouteKey(8, 32).for_layer(1) != RouteKey(9, 32).for_layer(1)


def test_without_a_key_eval_has_no_noise_and_training_fresh_noise():
    """The library call `model(idx)`: eval routes noise-free (the same as under any key) and
    draws nothing from the global RNG; training draws a fresh seed each call."""
    model = MoETransformer(tiny(), router("topk", jitter_eps=0.3, capacity_factor=0.5))
    idx = batch()[:, :-1]
    model.eval()
    state = torch.get_rng_state()
    plain, _ = model(idx)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(plain, model(idx, RouteKey(123, 64))[0])
    model.train()
    first, second = model(idx)[0], model(idx)[0]
    assert not torch.equal(first, second)
    assert not torch.equal(state, torch.get_rng_state())


# ---- built from configs alone: no process group, any device --------------------------------------
@pytest.fixture
def no_dist(monkeypatch):
    """Any call into torch.distributed fails the test."""
    forbid_torch_distributed(monkeypatch)


def test_one_rank_of_ep2_builds_on_cpu_without_a_process_group(no_dist):
    """Rank r of ep=2 holds experts [2r, 2r+2) of 4, the same weights as in the whole model."""
    from moe_train.parallel import ExpertShard

    torch.manual_seed(0)
    full = MoETransformer(tiny(), router("switch"), seed=5)
    for r in range(2):
        torch.manual_seed(0)
        part = MoETransformer(tiny(), router("switch"), seed=5, shard=ExpertShard(2, r))
        assert part.num_params()["dense"] == full.num_params()["dense"]
        assert 2 * part.num_params()["expert"] == full.num_params()["expert"]
        for whole, half in zip(full.moe_layers(), part.moe_layers()):
            assert half.experts.first_expert == 2 * r and half.experts.num_local == 2
            assert torch.equal(half.experts.w_in, whole.experts.w_in[2 * r : 2 * r + 2])
            assert torch.equal(half.experts.w_out, whole.experts.w_out[2 * r : 2 * r + 2])
        dense = [n for n, _ in part.named_parameters() if ".experts." not in n]
        for name in dense:
            assert torch.equal(part.get_parameter(name), full.get_parameter(name)), name


@pytest.mark.parametrize(("ep", "rank"), [(2, 1), (4, 3)])
def test_one_rank_builds_on_meta_and_counts_its_experts(no_dist, ep, rank):
    """The planner's case: any rank's model, shapes only (no memory, no init)."""
    from moe_train.parallel import ExpertShard

    cfg = tiny(num_experts=8, moe_every=1)
    whole = MoETransformer(cfg, router("topk")).num_params()
    with torch.device("meta"):
        part = MoETransformer(cfg, router("topk"), shard=ExpertShard(ep, rank))
    assert all(p.is_meta for p in part.parameters())
    counts = part.num_params()
    assert counts["dense"] == whole["dense"] and counts["expert"] * ep == whole["expert"]
    assert [m.experts.first_expert for m in part.moe_layers()] == [rank * 8 // ep] * 2


def test_expert_parallel_layer_without_groups_says_to_parallelize():
    from moe_train.parallel import ExpertShard

    layer = MoELayer(8, 8, 4, router=RouterConfig(kind="switch"), shard=ExpertShard(2, 0))
    with pytest.raises(RuntimeError, match=r"call moe_train\.parallel\.parallelize"):
        layer(torch.randn(2, 4, 8))


def test_parallelize_refuses_a_model_built_for_another_rank():
    from moe_train.parallel import (
        ExpertShard,
        ParallelConfig,
        ParallelDims,
        ProcessGroups,
        parallelize,
    )

    model = MoETransformer(tiny(), router("switch"), shard=ExpertShard(2, 1))
    with pytest.raises(ValueError, match="shard=dims.expert_shard"):
        parallelize(model, ParallelDims(), ProcessGroups(), ParallelConfig())
    one = MoETransformer(tiny(), router("switch"))  # one process: the same module back
    sync = parallelize(one, ParallelDims(), ProcessGroups(), ParallelConfig())
    assert sync.model is one and sync.module is one


def test_bad_floats_in_the_model_config_name_the_key():
    with pytest.raises(ValueError, match="model.init_std: must be a finite number"):
        tiny(init_std=float("nan")).validate()
    with pytest.raises(ValueError, match=r"model.dropout: must be in \[0, 1\)"):
        tiny(dropout=1.0).validate()
    with pytest.raises(ValueError, match="model.activation"):
        tiny(activation="relu").validate()
