"""Gradient strategy (moe_train.parallel.grad_sync, the math in grads.py) on hand-made gradients:
the flat-bucket sync over several buckets and dtypes, gradients present on one rank only, world
scaling, expert grads over the dp group, the global norm with tied and expert parameters counted
once, a DDP wrapper built without warnings; and the strategy `parallelize` chooses for each
configuration, with the model materialised before the DDP wrap and after FSDP's sharding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from moe_train.parallel import FlatSync, ParallelDims, ProcessGroups, mark_expert
from moe_train.parallel import grads as grads_mod
from tests.helpers.distributed import run_ranks


class Toy(nn.Module):
    """Dense fp32 and fp64 parameters, a tied pair, an expert, and one parameter that only some
    ranks use (its grad is None elsewhere)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(7))
        self.b = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
        self.emb = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter
        self.e = mark_expert(nn.Parameter(torch.zeros(2, 5)))
        self.rare = nn.Parameter(torch.zeros(6))


def fill(model: Toy, rank: int) -> None:
    """Rank-dependent gradients; `rare` has a gradient on rank 1 only."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name == "rare" and rank != 1:
            p.grad = None
            continue
        g = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
        p.grad = (g + 1) * (i + 1) * (rank + 1)


def expected(world: int, ep: int, rank: int) -> dict[str, torch.Tensor]:
    """What each rank should hold after sync: dense SUM over the world / world; experts SUM over
    the ranks with my ep_rank / world."""
    per_rank = []
    for r in range(world):
        m = Toy()
        fill(m, r)
        per_rank.append({n: p.grad for n, p in m.named_parameters()})
    out = {}
    for name in per_rank[0]:
        peers = [r for r in range(world) if name != "e" or r % ep == rank % ep]
        got = [per_rank[r][name] for r in peers if per_rank[r][name] is not None]
        out[name] = sum(got) / world
    return out


def _case(ep: int, rank: int, world: int) -> dict:
    from tests.helpers.ep_cases import make_state

    state = make_state(ep, num_experts=4)
    grads_mod.BUCKET_ELEMS = 5  # several buckets per dtype
    model = Toy()
    fill(model, rank)
    sync = FlatSync(model, state.dims, state.groups)
    sync.sync()
    want = expected(world, ep, rank)
    named = dict(model.named_parameters())
    diff = max(float((named[n].grad - want[n]).abs().max()) for n in want)
    # global norm: dense grads once, expert grads summed over the ep group (other experts there)
    dense_sq = sum(float(want[n].double().pow(2).sum()) for n in want if n != "e")
    expert_sq = sum(float(expected(world, ep, r)["e"].double().pow(2).sum()) for r in range(ep))
    want_norm = math.sqrt(dense_sq + expert_sq)
    norm = float(sync.clip(0.0))  # 0: measure only
    clipped = float(sync.clip(0.5 * want_norm))  # halves every gradient
    after = float(sync.clip(0.0))
    halved = max(float((named[n].grad - 0.5 * want[n]).abs().max()) for n in want)
    return {
        "diff": diff,
        "norm": norm,
        "want": want_norm,
        "clipped": clipped,
        "after": after,
        "halved": halved,
    }


def _strategies(state) -> dict:
    """Per configuration, what `parallelize` returns for a tiny model built on meta, and what the
    model was when it called `materialize` (sharded: every parameter a DTensor)."""
    from dataclasses import replace

    from torch.nn.parallel import DistributedDataParallel as DDP

    from moe_train.init import materialize
    from moe_train.model import MoETransformer
    from moe_train.parallel import parallelize
    from moe_train.routing import RouterConfig
    from tests.helpers.ep_cases import tiny_model_cfg

    def meta_model() -> MoETransformer:
        with torch.device("meta"):
            return MoETransformer(
                tiny_model_cfg(4), RouterConfig(kind="switch"), shard=state.dims.expert_shard
            )

    configs = {
        "fsdp": replace(state.cfg, fsdp=True),
        "ddp": replace(state.cfg, fsdp=False, overlap_grad_sync=True),
        "flat": replace(state.cfg, fsdp=False, overlap_grad_sync=False),
    }
    out: dict = {}
    for name, cfg in configs.items():
        model, seen = meta_model(), []

        def init(m, seen=seen):
            seen.append(all(hasattr(p, "to_local") for p in m.parameters()))
            materialize(m, torch.device("cpu"), 0)

        sync = parallelize(model, state.dims, state.groups, cfg, materialize=init)
        out[name] = {
            "kind": type(sync).__name__,
            "module_is_model": sync.module is model,
            "runs_ddp": isinstance(sync.model, DDP),
            "sharded_at_init": seen,
            "on_meta_after": any(p.is_meta for p in model.parameters()),
        }
    try:
        parallelize(meta_model(), state.dims, state.groups, configs["ddp"])
        out["ddp_on_meta"] = None
    except ValueError as e:
        out["ddp_on_meta"] = str(e)
    return out


def two_rank_main(rank: int, world: int) -> dict:
    from moe_train.parallel.parallelize import wrap_data_parallel
    from tests.helpers.ep_cases import make_state

    out = {f"ep{ep}": _case(ep, rank, world) for ep in (1, 2)}
    state = make_state(1, num_experts=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap_data_parallel(nn.Linear(4, 4), state.groups.dense)
    out["ddp_warnings"] = [str(w.message) for w in caught]
    out["strategies"] = _strategies(state)
    state.shutdown()
    return out


@pytest.mark.distributed
def test_flat_sync_scaling_norm_and_the_strategy_parallelize_chooses_on_two_ranks():
    for rank, res in enumerate(run_ranks(two_rank_main, 2, timeout=120)):
        for ep in ("ep1", "ep2"):
            r = res[ep]
            assert r["diff"] <= 1e-6, (rank, ep, r)
            assert r["norm"] == pytest.approx(r["want"], rel=1e-6), (rank, ep, r)
            assert r["clipped"] == pytest.approx(r["want"], rel=1e-6), (rank, ep, r)
            assert r["after"] == pytest.approx(0.5 * r["want"], rel=1e-5), (rank, ep, r)
            assert r["halved"] <= 1e-5 * r["want"], (rank, ep, r)
        assert not any("deprecated" in w for w in res["ddp_warnings"]), res["ddp_warnings"]
        got = res["strategies"]
        kinds = [got[k]["kind"] for k in ("fsdp", "ddp", "flat")]
        assert kinds == ["FSDPSync", "DDPSync", "FlatSync"], got
        # FSDP shards on meta, then materialises the shards; replicated: materialise, then wrap
        assert got["fsdp"]["sharded_at_init"] == [True], got
        assert got["ddp"]["sharded_at_init"] == got["flat"]["sharded_at_init"] == [False], got
        assert [got[k]["runs_ddp"] for k in ("fsdp", "ddp", "flat")] == [False, True, False]
        assert all(
            got[k]["module_is_model"] and not got[k]["on_meta_after"]
            for k in got
            if k != "ddp_on_meta"
        )
        assert "DDP needs materialised parameters" in (got["ddp_on_meta"] or ""), got


def test_buckets_keep_order_and_bound_the_size():
    ts = [torch.zeros(n) for n in (3, 3, 9, 1, 1, 2)]
    got = grads_mod.buckets(ts, 6)
    assert [[t.numel() for t in b] for b in got] == [[3, 3], [9], [1, 1, 2]]
    assert [t for b in got for t in b] == ts


def test_one_process_norm_counts_tied_parameters_once_and_clips():
    model = Toy()
    fill(model, 0)
    sync = FlatSync(model, ParallelDims(), ProcessGroups())
    sync.sync()  # one process: nothing to do
    unique = [p.grad for p in model.parameters() if p.grad is not None]  # parameters() dedups
    want = torch.sqrt(sum(g.double().pow(2).sum() for g in unique))
    norm = sync.clip(1.0)
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    after = torch.sqrt(sum(g.double().pow(2).sum() for g in unique))
    assert float(after) == pytest.approx(1.0, rel=1e-5)


def test_one_process_is_flat_and_materialises_once_whatever_the_options():
    from moe_train.model import MoETransformer
    from moe_train.parallel import ParallelConfig, parallelize
    from moe_train.routing import RouterConfig
    from tests.helpers.ep_cases import tiny_model_cfg

    for cfg in (ParallelConfig(fsdp=True), ParallelConfig(overlap_grad_sync=True)):
        with torch.device("meta"):
            model = MoETransformer(tiny_model_cfg(4), RouterConfig(kind="switch"))
        calls = []
        sync = parallelize(model, ParallelDims(), ProcessGroups(), cfg, materialize=calls.append)
        assert isinstance(sync, FlatSync) and sync.model is sync.module is model
        assert calls == [model]
