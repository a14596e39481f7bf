"""Bad layouts fail at start naming the fields; a dead or missing peer raises, never hangs."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from moe_train.parallel import ParallelConfig, init_parallel, parallelize
from moe_train.routing import RouterConfig
from tests.helpers.distributed import run_ranks

SWITCH = RouterConfig(kind="switch")


@pytest.mark.parametrize(
    ("cfg", "world", "experts", "router", "fields"),
    [
        (ParallelConfig(ep=3), 4, 6, SWITCH, ["parallel.ep", "world size"]),
        (ParallelConfig(ep=4), 4, 6, SWITCH, ["model.num_experts", "parallel.ep"]),
        (ParallelConfig(ep=2), 2, 7, RouterConfig(kind="tree"), ["model.num_experts"]),
        (
            ParallelConfig(ep=4),
            4,
            8,
            RouterConfig(kind="sam", num_groups=2),
            ["router.num_groups", "parallel.ep"],
        ),
        (
            ParallelConfig(ep=4),
            4,
            8,
            RouterConfig(kind="sam", num_groups=6),
            ["router.num_groups"],
        ),
        (ParallelConfig(backend="mpi"), 1, 8, SWITCH, ["parallel.backend"]),
        (ParallelConfig(timeout_s=0), 1, 8, SWITCH, ["parallel.timeout_s"]),
        (
            ParallelConfig(ep=2, hierarchical_a2a=True, ranks_per_node=3),
            6,
            8,
            SWITCH,
            ["parallel.ranks_per_node", "parallel.ep"],
        ),
    ],
)
def test_bad_layouts_name_the_fields(cfg, world, experts, router, fields):
    with pytest.raises(ValueError) as err:
        cfg.validate(world, experts, router)
    for f in fields:
        assert f in str(err.value)


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_sam_groups_that_map_onto_ranks_are_accepted(groups):
    ParallelConfig(ep=2).validate(4, 8, RouterConfig(kind="sam", num_groups=groups, top_k=1))


def test_single_process_without_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    state = init_parallel(ParallelConfig(), 8, SWITCH)
    d = state.dims
    assert (d.rank, d.world_size, d.dp, d.ep, state.groups.mesh) == (0, 1, 1, 1, None)
    assert state.groups.ep is None and d.is_main and not d.distributed
    model = torch.nn.Linear(1, 1)
    sync = parallelize(model, state.dims, state.groups, state.cfg)
    assert sync.model is model
    model.weight.grad = torch.full((1, 1), 3.0)
    model.bias.grad = torch.full((1,), 4.0)
    sync.sync()
    norm = sync.clip(1.0)
    assert abs(float(norm) - 5.0) < 1e-6
    assert abs(float(torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()) - 1) < 1e-5
    assert float(state.all_reduce_mean(torch.tensor(2.0))) == 2.0
    state.shutdown()


TIMEOUT_S = 3.0


def _forward_until_error(state) -> dict:
    from moe_train.layer import MoELayer
    from moe_train.parallel.parallelize import connect_process_groups

    layer = MoELayer(8, 8, 4, router=RouterConfig(kind="switch"), shard=state.dims.expert_shard)
    connect_process_groups(layer, state.dims, state.groups)  # no collective before the a2a
    try:
        layer(torch.randn(2, 4, 8))
        layer(torch.randn(2, 4, 8))
    except Exception as e:  # noqa: BLE001 - returned to the test
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def stall_main(rank: int, world: int, mode: str) -> dict | None:
    state = init_parallel(ParallelConfig(ep=2, timeout_s=TIMEOUT_S), 4, SWITCH)
    state.barrier()
    if rank == 1:
        if mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(TIMEOUT_S + 2)  # never arrives at the all-to-all
        return None
    return _forward_until_error(state)


stall_main.skip_teardown = True


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["missing", "killed"])
def test_dead_or_missing_peer_raises_within_timeout(mode):
    res = run_ranks(stall_main, 2, mode, timeout=60, allow_missing=True)
    r0 = res[0]
    assert r0 is not None and r0["error"] is not None, "rank 0 should have failed"
    assert "CollectiveError" in r0["error"] and "all_to_all_single" in r0["error"], r0["error"]
    assert "parallel.timeout_s" in r0["error"]
    # no wall-clock bound here: run_ranks kills the group after 60 s, so an error at all means the
    # configured 3 s timeout fired (gloo's default, 30 minutes, would leave no error to read)
