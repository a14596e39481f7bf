"""Switch Transformer top-1 routing (Fedus et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .losses import balance_loss


class SwitchRouter(Router):
    """p = softmax(W x); each token goes to argmax p with weight p_i; balance + z loss."""

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        weight, expert = probs.max(dim=-1)  # [T]
        token = torch.arange(T, device=logits.device)
        priority = self.priority(weight, token, 0, T)
        keep = self.keep(token, expert, priority, gs, self.capacity(gs, 1))
        losses = {"balance": self.cfg.balance_coef * balance_loss(probs, expert, gs)}
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, weight, keep, T, E, losses)
