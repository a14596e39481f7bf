"""GShard top-k routing (Lepikhin et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .losses import balance_loss


class TopKRouter(Router):
    """Top-k of softmax, weights renormalised over the k; GShard's random routing drops the
    j-th choice (j >= 2) unless k * w_j > U(0,1) (for k=2: 2 * g2 > U); aux loss on 1st choices."""

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, E = logits.shape
        k = self.cfg.top_k
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        top_p, top_e = probs.topk(k, dim=-1)  # [T, k]
        weight = top_p / top_p.sum(dim=-1, keepdim=True)
        token = torch.arange(T, device=logits.device).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=logits.device).expand(T, k)
        routed = torch.ones(T, k, dtype=torch.bool, device=logits.device)
        if self.training and self.cfg.effective_random_routing and k > 1:
            u = self.uniform(self.noise_seed, 2, (self.token_offset + token) * k + choice)
            routed = (choice == 0) | (k * weight.detach() > u)
        token, expert, w, choice = token[routed], top_e[routed], weight[routed], choice[routed]
        keep = self.keep(
            token, expert, self.priority(w, token, choice, T), gs, self.capacity(gs, k)
        )
        losses = {"balance": self.cfg.balance_coef * balance_loss(probs, top_e[:, 0], gs)}
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)
