"""Bit-pattern tree gating (Cho & Bengio 2014, arXiv 1406.7362) as an MoE router."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .config import RouterConfig


class TreeRouter(Router):
    """depth D gating units z = W x; their sign bits b_1..b_D pick a root-to-leaf path in a binary
    tree of 2^(D+1)-1 node experts (heap order: children of n are 2n+1, 2n+2). A token uses the D+1
    nodes on its path and sums their outputs, as the paper sums the weight blocks on the path.

    Gradient to the gate, by `tree_gate`:
    - straight_through (default): forward weight 1 for every node on the path (the paper's sum);
      backward as if the level-l weight were p_l = sigmoid(+-z_l), the probability of the branch taken.
    - sigmoid: weight p_l in forward and backward (root weight 1).
    Balance loss: per level l, 2^l * sum_n f_n * P_n over its nodes, with P_n the mean probability of
    reaching n (product of branch probabilities); summed over levels, times balance_coef.
    Capacity per node at level l: ceil(group_tokens / 2^l * cf).
    """

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts, gate_units=cfg.tree_depth)

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, D = logits.shape
        E = self.num_experts
        dev = logits.device
        bits = (logits > 0).long()  # [T, D]
        branch_p = torch.sigmoid(torch.where(bits.bool(), logits, -logits))  # [T, D], >= 0.5
        nodes = [torch.zeros(T, dtype=torch.long, device=dev)]
        for level in range(D):
            nodes.append(2 * nodes[-1] + 1 + bits[:, level])
        expert = torch.stack(nodes, dim=1)  # [T, D+1]
        ones = torch.ones(T, 1, device=dev)
        if self.cfg.tree_gate == "sigmoid":
            weight = torch.cat([ones, branch_p], dim=1)
        else:
            # (p - p.detach()) is exactly 0, so the forward weight is exactly 1
            weight = torch.cat([ones, branch_p - branch_p.detach() + 1], dim=1)

        # balance: probability of reaching every node, level by level
        balance = logits.new_zeros(())
        reach = ones  # [T, 2^l] for level l
        for level in range(1, D + 1):
            right = torch.sigmoid(logits[:, level - 1 : level])
            reach = torch.stack([reach * (1 - right), reach * right], dim=2).flatten(1)  # [T, 2^l]
            first = 2**level - 1
            local = expert[:, level] - first
            n = 2**level
            P = reach.view(T // gs, gs, n).mean(dim=1)  # [G, n]
            f = torch.zeros(T // gs, n, device=dev)
            f.view(-1).index_add_(
                0, (torch.arange(T, device=dev) // gs) * n + local, torch.ones(T, device=dev)
            )
            balance = balance + (n * (f / gs * P).sum(dim=1)).mean()

        token = torch.arange(T, device=dev).unsqueeze(1).expand(T, D + 1).flatten()
        choice = torch.arange(D + 1, device=dev).expand(T, D + 1).flatten()
        expert, weight = expert.flatten(), weight.flatten()
        cap = None
        if self.cfg.capacity_factor is not None:
            level_of = torch.floor(
                torch.log2(torch.arange(E, device=dev, dtype=torch.float64) + 1)
            ).long()
            cap = torch.ceil(gs / 2.0**level_of * self.cfg.capacity_factor).long().clamp(min=1)
        score = torch.cat([ones, branch_p], dim=1).flatten()
        keep = self.keep(token, expert, self.priority(score, token, choice, T), gs, cap)
        losses = {"balance": self.cfg.balance_coef * balance}
        return Assignment.from_slots(token, expert, weight, keep, T, E, losses)

    @staticmethod
    def num_nodes(depth: int) -> int:
        return 2 ** (depth + 1) - 1
