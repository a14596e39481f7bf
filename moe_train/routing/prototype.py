"""M6-T expert prototyping, "k top-1" (Yang et al. 2021)."""

from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .config import RouterConfig
from .context import RouteContext
from .losses import balance_loss
from .registry import register_router


@register_router("prototype")
class PrototypeRouter(Router):
    """Experts split into k contiguous prototypes of E/k; softmax and top-1 inside each (ties:
    the lowest expert id); y = sum_i p_i E_{i, j_i}(x) (no renormalisation); balance loss summed
    over prototypes; capacity per expert k * ceil(T/E * cf); z-loss averaged over prototypes."""

    compare_as = {"top_k": 2}
    softmax_reason = "each prototype is a softmax over its E/k experts, top-1 inside it"

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if num_experts % cfg.top_k:
            raise ValueError(
                f"router.top_k: prototype needs num_experts ({num_experts}) divisible by "
                f"top_k ({cfg.top_k})"
            )
        if cfg.top_k == num_experts:
            warnings.warn(
                f"router.top_k: prototype with top_k = num_experts = {num_experts} has one "
                "expert per prototype, so every weight is 1.0 and the gate gets no gradient "
                "through the combine weights; use router.kind=switch or a smaller top_k",
                UserWarning,
                stacklevel=2,
            )

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        """Prototype p covers experts [p*size, (p+1)*size); rank r holds [r*n, (r+1)*n)."""
        k, size, n = cfg.top_k, num_experts // cfg.top_k, num_experts // ep
        total = 0.0
        for r in range(ep):
            miss = 1.0
            for p in range(k):
                overlap = max(0, min((r + 1) * n, (p + 1) * size) - max(r * n, p * size))
                miss *= 1 - overlap / size
            total += 1 - miss
        return total

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        k = self.cfg.top_k
        n = E // k  # experts per prototype
        proto_logits = logits.view(T, k, n)
        probs = torch.softmax(proto_logits, dim=-1)  # [T, k, n]
        weight, local = probs.max(dim=-1)  # [T, k]; max returns the first maximal index
        offset = torch.arange(k, device=logits.device) * n
        expert = local + offset  # [T, k] global ids
        token = torch.arange(T, device=logits.device).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=logits.device).expand(T, k)
        per_expert = self.capacity(ctx.group_size, 1)
        cap = None if per_expert is None else k * per_expert  # k * ceil(T/E * cf)
        token, expert, w, choice = (
            token.flatten(),
            expert.flatten(),
            weight.flatten(),
            choice.flatten(),
        )
        keep = self.keep(token, expert, self.priority(w, token, choice, T), cap, ctx)
        gs = ctx.group_size
        balance = cast(Tensor, sum(balance_loss(probs[:, j], local[:, j], gs) for j in range(k)))
        losses = {"balance": self.cfg.balance_coef * balance}
        losses.update(self.z_loss_term(proto_logits))
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)
