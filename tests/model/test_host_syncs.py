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
