"""Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .capacity import expert_capacity, keep_within_capacity
from .config import RouterConfig
from .context import RouteContext
from .registry import register_router
from .select import topk_lowest_index


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """S = softmax(X W_g) per token; in each routing group every expert takes its top-C tokens
    (ties: the earliest tokens), C = ceil(group_tokens * c / E) (at most the group size); weight
    S[t, e]. No balance loss (balanced by construction). Optional `max_experts_per_token` keeps a
    token's best picks."""

    aux_losses: ClassVar[tuple[str, ...]] = ()
    compare_as = {"capacity_factor": 2.0}
    softmax_reason: ClassVar[str] = (
        "experts pick tokens by the per-token softmax S = softmax(X W_g)"
    )
    causal = False  # experts pick among the group's tokens, future ones included

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.capacity_factor is None:
            raise ValueError(
                "router.capacity_factor: expert_choice needs a capacity factor c (C = T*c/E), "
                "e.g. 2.0"
            )

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        """c on average (E experts x C = T c / E picks over T tokens), at most the cap."""
        c = float(cfg.capacity_factor or 0.0)
        cap = cfg.max_experts_per_token
        return min(c, cap) if cap else c

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        """Every expert takes a token with probability c/E, independently."""
        c = cls.experts_per_token(cfg)
        return ep * (1 - (1 - min(1.0, c / num_experts)) ** (num_experts // ep))

    @property
    def capacity_factor(self) -> float | None:
        """c of this forward: router.eval_capacity_factor in eval mode when set, else
        router.capacity_factor (expert choice has no dropless form)."""
        if not self.training and self.cfg.eval_capacity_factor is not None:
            return self.cfg.eval_capacity_factor
        return self.cfg.capacity_factor

    def picks_per_expert(self, gs: int) -> int:
        c = self.capacity_factor
        assert c is not None  # check_config
        return min(gs, expert_capacity(gs, 1, self.num_experts, c))

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        G, gs = ctx.num_groups, ctx.group_size
        C = self.picks_per_expert(gs)
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        scores = probs.view(G, gs, E).transpose(1, 2)  # [G, E, gs]
        top_s, top_t = topk_lowest_index(scores, C)  # [G, E, C]
        base = (torch.arange(G, device=logits.device) * gs).view(G, 1, 1)
        token = (top_t + base).flatten()
        expert = torch.arange(E, device=logits.device).view(1, E, 1).expand(G, E, C).flatten()
        weight = top_s.flatten()
        keep = None
        if self.cfg.max_experts_per_token is not None:
            keep = keep_within_capacity(token, weight.detach(), self.cfg.max_experts_per_token, T)
        losses = self.z_loss_term(logits)
        return Assignment.from_slots(token, expert, weight, keep, T, E, losses)
