"""The local (ep=1) MoE path reads nothing back to the host where the data does not require it.

Counted on CPU with tests/helpers/sync_counter.py, on the path a GPU takes (the grouped expert backend,
whose segment ends stay on the device); tests/gpu checks it on a GPU with
torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import pytest
import torch

from moe_train import MoELayer, RouteKey, RouterConfig
from moe_train.experts.grouped import _grouped_mm_on_cpu
from moe_train.ops.indexing import count_values
from tests.helpers.sync_counter import HostSyncCounter

needs_cpu_grouped = pytest.mark.skipif(
    not _grouped_mm_on_cpu(torch.float32), reason="this torch has no CPU _grouped_mm"
)

DROPLESS = {
    "switch": dict(kind="switch"),
    "topk": dict(kind="topk", top_k=2, random_routing=False),
    "prototype": dict(kind="prototype", top_k=2),
    "sam": dict(kind="sam", top_k=2, num_groups=2),
}


def syncs_of_a_training_step(
    cfg: RouterConfig, activation: str = "gelu", backend: str = "grouped"
) -> HostSyncCounter:
    layer = MoELayer(32, 48, 8, router=cfg, activation=activation)
    layer.experts.backend = backend  # grouped: the GPU's backend
    x = torch.randn(4, 16, 32, requires_grad=True)
    layer(x, RouteKey(1))  # warm-up (one-time probes)
    with HostSyncCounter() as counter:
        y, losses = layer(x, RouteKey(2))
        (y.square().sum() + sum(losses.values())).backward()
    assert x.grad is not None and layer.experts.w_in.grad.abs().sum() > 0
    return counter


@needs_cpu_grouped
@pytest.mark.parametrize("kind", sorted(DROPLESS))
def test_dropless_layer_forward_backward_has_no_host_sync(kind):
    counter = syncs_of_a_training_step(
        RouterConfig(capacity_factor=None, **DROPLESS[kind]), "swiglu"
    )
    assert counter.count == 0, dict(counter.ops)


@needs_cpu_grouped
def test_capacity_costs_exactly_one_sync_the_compaction_of_kept_slots():
    counter = syncs_of_a_training_step(RouterConfig(kind="switch", capacity_factor=1.0))
    assert dict(counter.ops) == {"aten.nonzero.default": 1}


def test_the_loop_backend_costs_exactly_one_sync_reading_the_expert_counts():
    """The fallback (no native grouped GEMM) needs the per-expert counts on the host, once."""
    counter = syncs_of_a_training_step(
        RouterConfig(kind="switch", capacity_factor=None), "gelu", "loop"
    )
    assert dict(counter.ops) == {"tolist": 1}


def test_the_counter_sees_what_would_sync():
    x = torch.arange(6)
    with HostSyncCounter() as counter:
        int(x.sum())
        x.tolist()
        x[x > 2]
        torch.repeat_interleave(x, x)
    assert counter.count == 4, dict(counter.ops)


def test_count_values_off_the_cpu_does_not_size_its_output_from_the_data():
    """The non-CPU branch (scatter-add, no bincount) runs on meta tensors, which have no data."""
    out = count_values(torch.empty(5, dtype=torch.int64, device="meta"), 3)
    assert out.shape == (3,) and out.device.type == "meta"
    torch.testing.assert_close(count_values(torch.tensor([2, 0, 2]), 4), torch.tensor([1, 0, 2, 0]))


# ---- expert parallel: one device-to-host read per all-to-all hop ---------------------------------
def _ep_syncs_main(rank: int, world: int) -> dict[str, dict[str, int]]:
    from moe_train.parallel import parallelize
    from tests.helpers.ep_cases import make_state

    layouts = {
        "ep4": dict(ep=4),
        "ep2 x dp2": dict(ep=2),
        "hierarchical ep4 (2 nodes of 2)": dict(ep=4, ranks_per_node=2, hierarchical_a2a=True),
    }
    out = {}
    for name, kw in layouts.items():
        state = make_state(**kw)
        cfg = RouterConfig(capacity_factor=None, **DROPLESS["topk"])
        layer = MoELayer(32, 48, 8, router=cfg, shard=state.dims.expert_shard)
        parallelize(layer, state.dims, state.groups, state.cfg)
        layer.experts.backend = "grouped"
        x = torch.randn(2, 16, 32, requires_grad=True)
        layer(x, RouteKey(1, 32 * rank))  # warm-up
        with HostSyncCounter() as counter:
            y, losses = layer(x, RouteKey(2, 32 * rank))
            (y.square().sum() + sum(losses.values())).backward()
        out[name] = dict(counter.ops)
    state.shutdown()
    return out


@needs_cpu_grouped
@pytest.mark.distributed
def test_expert_parallel_reads_the_host_once_per_hop():
    """The split sizes of a hop (rows and slots, sent and received) come to the host in one read
    of the stacked counts, and nothing else syncs in forward or backward: one read per flat layer
    call, two with the hierarchical all-to-all (two hops)."""
    from tests.helpers.distributed import run_ranks

    for rank, res in enumerate(run_ranks(_ep_syncs_main, 4, timeout=180)):
        assert res["ep4"] == {"tolist": 1}, (rank, res)
        assert res["ep2 x dp2"] == {"tolist": 1}, (rank, res)
        assert res["hierarchical ep4 (2 nodes of 2)"] == {"tolist": 2}, (rank, res)
