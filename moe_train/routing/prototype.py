"""M6-T expert prototyping, "k top-1" (Yang et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .losses import balance_loss, z_loss


class PrototypeRouter(Router):
    """Experts split into k contiguous prototypes of E/k; softmax and top-1 inside each;
    y = sum_i p_i E_{i, j_i}(x) (no renormalisation); balance loss summed over prototypes;
    capacity per expert k * ceil(T/E * cf); z-loss averaged over prototypes."""

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, E = logits.shape
        k = self.cfg.top_k
        n = E // k  # experts per prototype
        proto_logits = logits.view(T, k, n)
        probs = torch.softmax(proto_logits, dim=-1)  # [T, k, n]
        weight, local = probs.max(dim=-1)  # [T, k]
        offset = torch.arange(k, device=logits.device) * n
        expert = local + offset  # [T, k] global ids
        token = torch.arange(T, device=logits.device).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=logits.device).expand(T, k)
        per_expert = self.capacity(gs, 1)
        cap = None if per_expert is None else k * per_expert  # k * ceil(T/E * cf)
        token, expert, w, choice = (
            token.flatten(),
            expert.flatten(),
            weight.flatten(),
            choice.flatten(),
        )
        keep = self.keep(token, expert, self.priority(w, token, choice, T), gs, cap)
        balance = sum(balance_loss(probs[:, j], local[:, j], gs) for j in range(k))
        losses = {"balance": self.cfg.balance_coef * balance}
        if self.cfg.z_loss_coef > 0:
            losses["z"] = self.cfg.z_loss_coef * z_loss(proto_logits)
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)
