"""Layout-invariant initialisation (moe_train.init): the model built on `meta` and materialised
equals the model built in place; a rank of any ep layout holds exactly the matching slices of the
1-process experts; on 4 gloo ranks with FSDP each rank materialises only its shards, and the
gathered model equals the 1-process one."""

from __future__ import annotations

import pytest
import torch

from moe_train.init import materialize
from moe_train.model import ModelConfig, MoETransformer
from moe_train.parallel import ExpertShard
from moe_train.routing import RouterConfig
from tests.helpers.distributed import run_ranks

TINY = {"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4,
        "d_ff": 128, "num_experts": 4, "moe_every": 1}  # fmt: skip


def build(shard: ExpertShard | None = None, meta: bool = False, seed: int = 7) -> MoETransformer:
    cfg, router = ModelConfig(**TINY), RouterConfig(kind="sam", num_groups=2)
    if not meta:
        return MoETransformer(cfg, router, seed=seed, shard=shard)
    with torch.device("meta"):
        model = MoETransformer(cfg, router, seed=seed, shard=shard)
    return materialize(model, torch.device("cpu"), seed)


def test_meta_then_materialize_equals_the_model_built_in_place():
    ref, model = build(), build(meta=True)
    assert model.head.weight is model.tok_emb.weight  # the tie survives to_empty
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(64))
    assert not torch.equal(build(seed=8).blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


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
