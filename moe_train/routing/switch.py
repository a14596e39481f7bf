"""Switch Transformer top-1 routing (Fedus et al. 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .config import RouterConfig
from .context import RouteContext
from .losses import balance_loss
from .registry import register_router


@register_router("switch")
class SwitchRouter(Router):
    """p = softmax(W x); each token goes to argmax p (ties: the lowest expert id) with weight p_i;
    balance + z loss."""

    default_jitter_eps: ClassVar[float] = 0.01
    softmax_reason: ClassVar[str] = (
        "Switch's weight is the chosen softmax probability; sigmoid top-1 is router.kind=topk "
        "router.top_k=1 router.normalize_topk=false"
    )

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        return 1

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        return 1.0

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        weight, expert = probs.max(dim=-1)  # [T]; max returns the first maximal index
        token = torch.arange(T, device=logits.device)
        priority = self.priority(weight, token, 0, T)
        keep = self.keep(token, expert, priority, self.capacity(ctx.group_size, 1), ctx)
        losses = {"balance": self.cfg.balance_coef * balance_loss(probs, expert, ctx.group_size)}
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, weight, keep, T, E, losses)
