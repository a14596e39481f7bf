"""Bit-pattern tree gating (Cho & Bengio 2014, arXiv 1406.7362) as an MoE router."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .capacity import expert_capacity
from .config import RouterConfig
from .context import RouteContext
from .registry import register_router

TREE_GATES = ("straight_through", "sigmoid")
MAX_DEPTH = 12


@register_router("tree")
class TreeRouter(Router):
    """depth D gating units z = W x; their sign bits b_1..b_D pick a root-to-leaf path in a binary
    tree of 2^(D+1)-1 node experts (heap order: children of n are 2n+1, 2n+2; z = 0 goes left).

    What is implemented: a token runs through the D+1 node experts on its path and the layer sums
    their outputs, y = sum_l w_l E_{n_l}(x). The paper instead sums the weight blocks on the path
    into one weight and applies the layer once, f((sum_l W_{n_l}) x); the two agree only when the
    experts are linear maps (ours are FFNs with their own nonlinearity).

    Gradient to the gate, by `tree_gate`:
    - straight_through (default): forward weight 1 for every node on the path (the paper's sum);
      backward as if the level-l weight were p_l = sigmoid(+-z_l), the probability of the branch taken.
    - sigmoid: weight p_l in forward and backward (root weight 1).
    Balance loss: per level l, 2^l * sum_n f_n * P_n over its nodes, with P_n the mean probability of
    reaching n (product of branch probabilities); summed over levels, times balance_coef.
    z-loss (router.z_loss_coef): each unit is a 2-way softmax over the logits (-z/2, +z/2) (the
    gauge that does not favour a branch; sigmoid(z) is that softmax), so
    z = mean over tokens and units of logsumexp(-z/2, z/2)^2, like the prototypes' per-softmax mean.
    Capacity per node at level l: ceil(group_tokens / 2^l * cf).
    """

    compare_as = None  # the depth fixes the expert count: not comparable on the same model
    softmax_reason = "its gating units are sigmoid branch decisions, with no per-expert score"

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.tree_gate not in TREE_GATES:
            raise ValueError(
                f"router.tree_gate: got {cfg.tree_gate!r}; allowed: {', '.join(TREE_GATES)}"
            )
        if not 1 <= cfg.tree_depth <= MAX_DEPTH:
            raise ValueError(
                f"router.tree_depth: must be in [1, {MAX_DEPTH}], got {cfg.tree_depth}"
            )
        nodes = cls.num_nodes(cfg.tree_depth)
        if num_experts != nodes:
            raise ValueError(
                f"model.num_experts: the tree of router.tree_depth={cfg.tree_depth} has "
                f"{nodes} node experts, got num_experts={num_experts}"
            )

    @classmethod
    def num_experts_for(cls, cfg: RouterConfig, num_experts: int) -> int:
        return cls.num_nodes(cfg.tree_depth)

    @classmethod
    def gate_units(cls, cfg: RouterConfig, num_experts: int) -> int:
        return cfg.tree_depth

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        return cfg.tree_depth + 1

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        """Mean over the 2^D equally likely root-to-leaf paths of the ranks they touch."""
        depth, n, total = cfg.tree_depth, num_experts // ep, 0
        for leaf in range(2**depth):
            node, ranks = 0, {0}
            for level in range(depth):
                node = 2 * node + 1 + ((leaf >> (depth - 1 - level)) & 1)
                ranks.add(node // n)
            total += len(ranks)
        return total / 2**depth

    @staticmethod
    def num_nodes(depth: int) -> int:
        return 2 ** (depth + 1) - 1

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
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

        token = torch.arange(T, device=dev).unsqueeze(1).expand(T, D + 1).flatten()
        choice = torch.arange(D + 1, device=dev).expand(T, D + 1).flatten()
        score = torch.cat([ones, branch_p], dim=1).flatten()
        priority = self.priority(score, token, choice, T)
        keep = self.keep(token, expert.flatten(), priority, self.node_capacity(ctx, dev), ctx)
        losses = {"balance": self.cfg.balance_coef * self.balance(logits, expert, ctx)}
        losses.update(self.z_loss_term(torch.stack([-logits / 2, logits / 2], dim=-1)))
        return Assignment.from_slots(token, expert.flatten(), weight.flatten(), keep, T, E, losses)

    def node_capacity(self, ctx: RouteContext, device: torch.device) -> Tensor | None:
        """[E] capacity of each node: ceil(group_tokens / 2^level * cf), exact."""
        cf = self.capacity_factor  # eval mode: router.eval_capacity_factor
        if cf is None:
            return None
        D = self.cfg.tree_depth
        per_level = [expert_capacity(ctx.group_size, 1, 2**level, cf) for level in range(D + 1)]
        width = torch.tensor([2**level for level in range(D + 1)], device=device)
        return torch.tensor(per_level, device=device).repeat_interleave(width)

    def balance(self, logits: Tensor, expert: Tensor, ctx: RouteContext) -> Tensor:
        """Sum over levels of 2^l * sum_n f_n P_n, averaged over routing groups."""
        T, D = logits.shape
        G, gs, dev = ctx.num_groups, ctx.group_size, logits.device
        balance = logits.new_zeros(())
        reach = torch.ones(T, 1, device=dev)  # [T, 2^l] probability of reaching each node
        for level in range(1, D + 1):
            right = torch.sigmoid(logits[:, level - 1 : level])
            reach = torch.stack([reach * (1 - right), reach * right], dim=2).flatten(1)  # [T, 2^l]
            n = 2**level
            local = expert[:, level] - (n - 1)
            P = reach.view(G, gs, n).mean(dim=1)  # [G, n]
            f = torch.zeros(G, n, device=dev)
            f.view(-1).index_add_(
                0, (torch.arange(T, device=dev) // gs) * n + local, torch.ones(T, device=dev)
            )
            balance = balance + (n * (f / gs * P).sum(dim=1)).mean()
        return balance
