"""Every current-generation routing option at once (sigmoid scores, normalize_topk=false,
route_scale, aux-loss-free bias, group-limited routing with one group per ep rank, a gated shared
expert) on 4 gloo ranks (ep=2 x dp=2, with gradient accumulation), FSDP off and on, reproduces
the 1-process run within 1e-4 per step: losses and every layer's bias (min and max, logged every
step). The 4-rank runs resume the 1-process run's half-way checkpoint, so the bias is also
restored across layouts (ep=1 -> ep=2 x dp=2, plain and FSDP-sharded); the second half is
compared (CI time: two 10-step 4-rank runs and the shared 1-process reference)."""

from __future__ import annotations

import pytest

from moe_train.metrics import read_metrics
from tests.helpers.cli_runs import HALF, STEPS, resume_from, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODERN = [
    "router=topk",
    "router.score=sigmoid",
    "router.normalize_topk=false",
    "router.route_scale=2.5",
    "router.bias_update_rate=0.01",
    "router.num_groups=2",
    "router.topk_groups=1",
    "model.shared_experts=1",
    "model.shared_gate=true",
]
LAYOUT = ["parallel.ep=2", "trainer.micro_batch_size=1"]
BIAS_KEYS = ("moe0/bias_min", "moe0/bias_max", "moe1/bias_min", "moe1/bias_max")


def biases(run_dir) -> list[tuple[float, ...]]:
    return [tuple(r[k] for k in BIAS_KEYS) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_modern_routing_on_four_ranks_reproduces_one_process(tmp_path, single_process_curve, fsdp):
    single = single_process_curve(MODERN)
    single_dir = single_process_curve.run_dir(MODERN)
    layout = [*LAYOUT, *(["parallel.fsdp=true"] if fsdp else [])]
    # resume the 1-process checkpoint of step HALF on 4 ranks (the bias crosses layouts)
    multi_dir = resume_from(single_dir / f"step_{HALF:08d}", tmp_path / "multi")
    steps = range(HALF, STEPS)
    multi = run(tmp_path, multi_dir, 4, [*MODERN, *layout])
    assert len(multi) == len(steps)
    assert single[-1] < single[0]  # it trains
    single_bias, multi_bias = biases(single_dir), biases(multi_dir)
    assert max(abs(v) for row in single_bias for v in row) >= 0.01 - 1e-6  # the bias moved
    for i, step in enumerate(steps):
        a, b = single[step], multi[i]
        assert b == pytest.approx(a, rel=1e-4), f"step {step + 1}: 1 process {a}, 4 ranks {b}"
        want, got = single_bias[step], multi_bias[i]
        assert got == pytest.approx(want, abs=1e-6), f"step {step + 1}: bias {want} vs {got}"
