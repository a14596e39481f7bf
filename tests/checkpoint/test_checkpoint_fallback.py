"""On 2 ranks (ep=2), a damaged shard written by rank 1 is found by the checksums that the ranks
compute between them, and every rank falls back to the same earlier checkpoint (no hang)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.ep_cases import CKPT_ROUTER, build_model, eval_logits, make_state, train_steps

pytestmark = [pytest.mark.distributed]


def fallback_main(rank: int, world: int, run_dir: str) -> dict:
    from pathlib import Path

    from moe_train.checkpoint import load_latest_checkpoint, save_checkpoint

    state = make_state(2)
    sync, opt = build_model(state, CKPT_ROUTER, seed=3)
    train_steps(state, sync, opt, range(1), seed=3)
    save_checkpoint(run_dir, 1, sync.module, opt, {"step": 1}, state)
    at_1 = eval_logits(state, sync)
    train_steps(state, sync, opt, range(1, 2), seed=3)
    save_checkpoint(run_dir, 2, sync.module, opt, {"step": 2}, state)
    if rank == 0:  # damage a shard rank 1 wrote (its experts), as a disk would
        shard = Path(run_dir) / "step_00000002" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\xff\x7f\x7f"
        shard.write_bytes(bytes(data))
    state.barrier()
    fresh, fresh_opt = build_model(state, CKPT_ROUTER, seed=77)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, extra = load_latest_checkpoint(run_dir, fresh.module, fresh_opt, state)
    out = {
        "path": Path(path).name,
        "extra": extra,
        "same_as_step_1": bool(torch.equal(eval_logits(state, fresh), at_1)),
        "warnings": [str(w.message) for w in caught],
    }
    state.shutdown()
    return out


def test_damaged_shard_of_another_rank_makes_every_rank_fall_back(tmp_path):
    results = run_ranks(fallback_main, 2, str(tmp_path), timeout=180)
    for r in results:
        assert r["path"] == "step_00000001" and r["extra"] == {"step": 1}
        assert r["same_as_step_1"]
    assert any("__1_0.distcp: checksum" in w for w in results[0]["warnings"])
    assert (tmp_path / ".corrupt_step_00000002").is_dir()
