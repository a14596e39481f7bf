"""FSDP2 x expert parallelism reproduces the 1-process loss curve: `moe-train` on 4 gloo ranks
(ep=2 x dp=2, or ep=1 x dp=4 for the tree) with parallel.fsdp=true, within 1e-4 relative per step
over 20 steps, for every router kind; activation checkpointing (full and moe), gradient
accumulation (FSDP accumulates unsharded, reduce-scatters once) and Adafactor are folded into the
router cases so that each runs once. The 1-process references are shared with test_cli_parity."""

from __future__ import annotations

import pytest

from moe_train.metrics import read_metrics
from tests.helpers.cli_runs import MODERN_ROUTING, STEPS, bias_curve, run

pytestmark = pytest.mark.distributed

FSDP = ["parallel.fsdp=true"]
# case -> (1-process overrides, extra 4-rank overrides)
CASES = {
    "switch-ckpt_full": (
        ["router=switch"],
        ["parallel.ep=2", "trainer.activation_checkpointing=full"],
    ),
    # every current-generation option, its bias counted once under recompute
    "topk-ckpt_moe": (
        ["router=topk", *MODERN_ROUTING],
        ["parallel.ep=2", "trainer.activation_checkpointing=moe"],
    ),
    "prototype-accum": (["router=prototype"], ["parallel.ep=2", "trainer.micro_batch_size=1"]),
    "sam": (
        ["router=sam", "model.num_experts=8", "router.num_groups=4"],
        ["parallel.ep=2", "parallel.reshard_after_forward=false"],
    ),
    "expert_choice-ckpt_full-accum": (
        ["router=expert_choice"],
        ["parallel.ep=2", "trainer.activation_checkpointing=full", "trainer.micro_batch_size=1"],
    ),
    "tree": (["router=tree"], ["parallel.ep=1"]),
    "switch-adafactor-accum": (
        ["router=switch", "optim=adafactor"],
        ["parallel.ep=2", "trainer.micro_batch_size=1"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_on_four_ranks_reproduces_the_single_process_loss_curve(
    tmp_path, single_process_curve, case
):
    single_overrides, layout = CASES[case]
    single = single_process_curve(single_overrides)
    multi = run(tmp_path, tmp_path / "multi", 4, [*single_overrides, *FSDP, *layout])
    assert len(single) == len(multi) == STEPS
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, multi), start=1):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: 1 process {a}, 4 ranks {b}"
    single_bias = bias_curve(single_process_curve.run_dir(single_overrides))
    for step, (a, b) in enumerate(zip(single_bias, bias_curve(tmp_path / "multi")), start=1):
        assert b == pytest.approx(a, abs=1e-6), f"step {step}: bias {a} on 1 process, {b}"
    # Adam and Adafactor hardly see a constant factor on the gradients (and clipping hides a
    # uniform one), the norm does: FSDP on torch 2.7's gloo summed where it should average
    single_norms = _grad_norms(single_process_curve.run_dir(single_overrides))
    for step, (a, b) in enumerate(zip(single_norms, _grad_norms(tmp_path / "multi")), start=1):
        assert b == pytest.approx(a, rel=1e-3), f"step {step}: grad norm {a} vs {b} on 4 ranks"


def _grad_norms(run_dir) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]
