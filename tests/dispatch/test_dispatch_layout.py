"""Send layout (per-destination dedup) and the local dispatcher path, no process group.
(Expert-parallel and hierarchical paths: tests/parallel/test_ep_parity.py.)"""

from __future__ import annotations

import torch

from moe_train.dispatch import Dispatcher, plan_send
from moe_train.routing import Assignment


def test_plan_send_sends_each_token_once_per_destination_rank():
    # 4 tokens, 4 experts on 2 ranks (2 each); token 0 -> experts 0,1 (both rank 0): one row
    token = torch.tensor([0, 0, 1, 1, 2, 3])
    expert = torch.tensor([0, 1, 0, 3, 2, 3])
    plan = plan_send(token, expert, num_tokens=4, experts_per_rank=2, ep=2)
    assert plan.row_splits.tolist() == [2, 3]  # rank 0: tokens 0,1; rank 1: tokens 1,2,3
    row_token = plan.row_tokens()
    assert row_token.tolist() == [0, 1, 1, 2, 3]
    assert plan.slot_splits.tolist() == [3, 3]
    # every slot points at the row of its token inside its destination chunk
    starts = [0, 2]
    for s, slot in enumerate(plan.slot_order.tolist()):
        dest = int(expert[slot]) // 2
        row = starts[dest] + int(plan.slot_row[s])
        assert int(row_token[row]) == int(token[slot])
        assert int(plan.slot_local_expert[s]) == int(expert[slot]) - 2 * dest


def test_plan_send_with_no_slots_and_idle_ranks():
    empty = torch.zeros(0, dtype=torch.int64)
    plan = plan_send(empty, empty, num_tokens=3, experts_per_rank=2, ep=4)
    assert plan.row_splits.tolist() == [0, 0, 0, 0] and plan.row_tokens().numel() == 0


def test_local_dispatch_matches_dense_sum_and_reports_stats():
    T, d, E = 5, 3, 4
    x = torch.randn(T, d)
    token = torch.tensor([0, 0, 1, 3, 4])
    expert = torch.tensor([1, 2, 0, 3, 1])
    weight = torch.tensor([0.5, 0.25, 1.0, 2.0, -1.0])
    a = Assignment(token, expert, weight, T, E)
    scale = torch.arange(1, E + 1, dtype=torch.float32)

    def experts(rows, counts):
        ids = torch.repeat_interleave(torch.arange(E), counts)  # counts: [E] int64 tensor
        return rows * scale[ids].unsqueeze(1)

    y, stats = Dispatcher(E)(x, a, experts)
    want = torch.zeros(T, d)
    for t, e, w in zip(token.tolist(), expert.tolist(), weight.tolist()):
        want[t] += w * (e + 1) * x[t]
    torch.testing.assert_close(y, want)
    assert stats["slots"] == 5 and stats["expert_slots"] == 5
    assert stats["dispatch_rows"] == 4 and stats["send_bytes"] == 0  # token 2 is not routed
