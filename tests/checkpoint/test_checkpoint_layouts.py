"""A checkpoint saved in one layout resumes in another on the same loss curve (1e-4 relative):
saved at step 10 of 20 by 4 ranks (ep=2 x dp=2, parallel.fsdp=true: DTensor shards, per-expert
DTensor views; written in the background with trainer.async_checkpoint=true), resumed by 1
process (no FSDP) and by 4 ranks at ep=4 (no FSDP); and the other way round, saved by 1 process,
resumed at ep=2 with FSDP. The reference is the uninterrupted 1-process curve, and its logged
balancing biases (router.bias_update_rate: a replicated [E] buffer per MoE layer). (A checkpoint of
replicated ep ranks loading at ep=1 and ep=4: test_ep_parity.)"""

from __future__ import annotations

import pytest

from tests.helpers.cli_runs import HALF, STEPS, bias_curve, resume_from, run

pytestmark = pytest.mark.distributed

ROUTER = [
    "router=topk",
    "optim=adafactor",  # stacked expert state of another shape than W
    "router.bias_update_rate=0.01",  # the balancing bias: a replicated [E] buffer per layer
    "model.shared_experts=1",  # dense shared experts, FSDP-sharded with the dense parameters
]
FSDP_EP2 = ["parallel.ep=2", "parallel.fsdp=true"]
EP4 = ["parallel.ep=4"]


def _check(reference: list[float], resumed: list[float], what: str) -> None:
    assert len(resumed) == STEPS - HALF, what
    for step, (a, b) in enumerate(zip(reference[HALF:], resumed), start=HALF + 1):
        assert b == pytest.approx(a, rel=1e-4), f"{what}, step {step}: {a} uninterrupted, {b}"


def test_checkpoints_resume_across_layouts(tmp_path, single_process_curve):
    reference = single_process_curve(ROUTER)
    ckpt = f"step_{HALF:08d}"
    saved = {"1 process": single_process_curve.run_dir(ROUTER) / ckpt}
    async_fsdp = [*FSDP_EP2, "trainer.async_checkpoint=true"]
    full = run(tmp_path, tmp_path / "ep2_fsdp", 4, [*ROUTER, *async_fsdp], ckpt_every=HALF)
    _check(reference, full[HALF:], "ep=2 fsdp uninterrupted")
    saved["ep=2 fsdp"] = tmp_path / "ep2_fsdp" / ckpt
    moves = [
        ("ep=2 fsdp", 1, []),
        ("ep=2 fsdp", 4, EP4),
        ("1 process", 4, FSDP_EP2),
    ]
    for i, (source, nproc, layout) in enumerate(moves):
        run_dir = resume_from(saved[source], tmp_path / f"resumed{i}")
        resumed = run(tmp_path, run_dir, nproc, [*ROUTER, *layout], ckpt_every=HALF)
        _check(reference, resumed, f"saved by {source}, resumed on {nproc} ranks {layout}")
        # the bias came back and moves on as uninterrupted (it did move: rate 0.01 a step)
        want = bias_curve(single_process_curve.run_dir(ROUTER))[HALF:]
        assert max(abs(v) for row in want for v in row) > 0
        got = bias_curve(run_dir)
        assert len(got) == len(want)
        for step, (a, b) in enumerate(zip(want, got), start=HALF + 1):
            assert b == pytest.approx(a, abs=1e-6), f"{source} -> {nproc} {layout}, step {step}"
