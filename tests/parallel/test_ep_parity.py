"""Expert parallel x data parallel equals one process: outputs, every gradient, losses, bytes,
hierarchical all-to-all, and checkpoints resharded ep=2 -> ep=4 -> ep=1.

Two process launches do all the work (module-scoped fixtures): 2 gloo ranks (ep=2) and 4 gloo
ranks (ep=2 x dp=2, ep=4, ep=1 x dp=4, and 2 "nodes" of 2 for the hierarchical all-to-all).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.ep_cases import (
    CKPT_ROUTER,
    SEQ,
    STEP_ROUTERS,
    D,
    build_model,
    eval_logits,
    four_rank_main,
    rel_close,
    train_steps,
    two_rank_main,
)

pytestmark = [pytest.mark.distributed]

GRAD_KEYS = ("x_grad", "router_grad", "w_in_grad", "w_out_grad")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt_ep"))


@pytest.fixture(scope="module")
def two(ckpt_dir) -> list[dict]:
    return run_ranks(two_rank_main, 2, ckpt_dir, timeout=180)


@pytest.fixture(scope="module")
def four(two, ckpt_dir) -> list[dict]:
    return run_ranks(four_rank_main, 4, ckpt_dir, timeout=300)


def assert_layer_equal(res: dict[str, float], what: str) -> None:
    assert res["y"] <= 1e-5, f"{what}: outputs differ by {res['y']}"
    assert res["loss"] <= 1e-5, f"{what}: loss differs by {res['loss']}"
    scale = max(res["grad_scale"], 1e-3)
    for k in GRAD_KEYS:
        assert res[k] <= 1e-5 * scale + 1e-8, f"{what}: {k} differs by {res[k]} (scale {scale})"
    if "norm_rel" in res:
        assert res["norm_rel"] <= 1e-5, f"{what}: global grad norm differs ({res['norm_rel']})"


def check_suite(results: list[dict], key: str) -> None:
    for rank, r in enumerate(results):
        for case, res in r[key].items():
            assert_layer_equal(res, f"{key}/{case} rank {rank}")


def test_layer_parity_2_ranks_ep2(two):
    check_suite(two, "layer_ep2")


@pytest.mark.parametrize("key", ["layer_ep2", "layer_ep4", "layer_ep1"])
def test_layer_parity_4_ranks(four, key):
    """ep=2 x dp=2, ep=4 x dp=1, ep=1 x dp=4 (includes the tree router, 7 experts)."""
    check_suite(four, key)


def test_dropped_tokens_and_zero_token_ranks_are_covered(two, four):
    """The suites above include dropped slots and ranks whose experts get no token at all."""
    for results, key in ((two, "layer_ep2"), (four, "layer_ep2"), (four, "layer_ep4")):
        assert any(r[key]["switch_drop"]["dropped"] > 0 for r in results)
        assert any(r[key]["push_switch_drop"]["dropped"] > 0 for r in results)
        ep = int(key[-1])
        for case in ("push_switch", "push_switch_drop", "push_topk"):
            # experts 0 and 1 (ep-rank 0) take every token: the other ranks compute nothing
            for rank, r in enumerate(results):
                slots = r[key][case]["stat_expert_slots"]
                assert (slots > 0) if rank % ep == 0 else (slots == 0), (key, case, rank, slots)


def test_bytes_sam_k2_equal_switch_top1(two):
    """SAM and group-limited topk (topk_groups=1, a group per rank) send each token to ONE rank
    whatever k: their token payload equals Switch top-1's."""
    for r in two:
        b = r["bytes"]
        tokens = 8 // 2 * SEQ
        assert b["switch"]["stat_dispatch_rows"] == tokens
        assert b["sam"]["stat_dispatch_rows"] == tokens
        assert (
            b["sam"]["stat_dispatch_bytes"] == b["switch"]["stat_dispatch_bytes"] == tokens * D * 4
        )
        assert b["sam"]["stat_slots"] == 2 * b["switch"]["stat_slots"]
        # group-limited topk, topk_groups=1 of one group per rank: one destination rank too
        assert b["topk_groups"]["stat_dispatch_rows"] == tokens
        assert b["topk_groups"]["stat_slots"] == 2 * b["switch"]["stat_slots"]
    # top-2 without grouping sends some tokens to two ranks
    assert sum(r["bytes"]["topk"]["stat_dispatch_rows"] for r in two) > 2 * 8 // 2 * SEQ


def _reference_steps(rc, steps=3) -> list[float]:
    sync, opt = build_model(None, rc)
    return train_steps(None, sync, opt, range(steps))["losses"]


@pytest.mark.parametrize("router", list(STEP_ROUTERS))
def test_optimizer_steps_match_one_process(two, four, router):
    """A few AdamW steps (global-norm clipping) give the same per-step losses as 1 process."""
    ref = _reference_steps(STEP_ROUTERS[router])
    runs = {"ep2 (2 ranks)": two[0]["steps_ep2"], "ep2 x dp2": four[0]["steps_ep2"]}
    if router in four[0]["steps_ep4"]:
        runs["ep4"] = four[0]["steps_ep4"]
    for name, steps in runs.items():
        got = steps[router]["losses"]
        assert rel_close(got, ref, 1e-4), f"{router} {name}: {got} vs 1 process {ref}"
    for r in four:  # every rank reports the same global loss
        assert r["steps_ep2"][router]["losses"] == four[0]["steps_ep2"][router]["losses"]


def test_hierarchical_all_to_all_equals_flat(four):
    for rank, r in enumerate(four):
        for name, h in r["hier"].items():
            assert_layer_equal(h["hier"], f"hier/{name} rank {rank}")
            assert_layer_equal(h["flat"], f"flat/{name} rank {rank}")
            assert_layer_equal(h["push"], f"hier push/{name} rank {rank}")
            assert abs(h["hier"]["y"] - h["flat"]["y"]) <= 1e-5
            if name in ("switch_drop", "expert_choice"):
                continue  # expected_rows re-routes dropless token choice only
            e = h["expect"]
            assert h["flat"]["stat_dispatch_rows"] == e["rows_all"], (name, rank)
            assert h["flat"]["stat_inter_node_rows"] == e["rows_remote_node_flat"], (name, rank)
            # one row per (token, remote node): each token crosses the node link once per node
            assert h["hier"]["stat_inter_node_rows"] == e["rows_remote_node_hier"], (name, rank)
    total = {
        mode: sum(r["hier"]["topk"][mode]["stat_inter_node_bytes"] for r in four)
        for mode in ("flat", "hier")
    }
    assert 0 < total["hier"] < total["flat"], total


def test_reshard_ep2_to_ep4_and_ep1(two, four, ckpt_dir):
    """Saved at ep=2 (2 ranks), loaded at ep=4 (4 ranks) and ep=1 (this process): the same
    function, and the optimizer state moved with its experts (the next steps' losses agree)."""
    saved = torch.cat([r["ckpt"]["logits"] for r in two])
    at4 = torch.cat([r["ckpt"]["logits"] for r in four])
    torch.testing.assert_close(at4, saved, rtol=1e-5, atol=1e-5)
    assert four[0]["ckpt"]["extra"] == {"step": 2, "data": [1, 2]}
    assert rel_close(four[0]["ckpt"]["next"], two[0]["ckpt"]["next"], 1e-4)

    from moe_train.checkpoint import latest_checkpoint, load_checkpoint

    sync, opt = build_model(None, CKPT_ROUTER, seed=123)
    ckpt = latest_checkpoint(ckpt_dir)
    extra = load_checkpoint(ckpt, sync.module, opt)
    assert extra["step"] == 2
    torch.testing.assert_close(eval_logits(None, sync), saved, rtol=1e-5, atol=1e-5)
    nxt = train_steps(None, sync, opt, range(2, 4), seed=3)["losses"]
    assert rel_close(nxt, two[0]["ckpt"]["next"], 1e-4), (nxt, two[0]["ckpt"]["next"])
