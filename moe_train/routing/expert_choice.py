"""Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .capacity import keep_within_capacity


class ExpertChoiceRouter(Router):
    """S = softmax(X W_g) per token; in each routing group every expert takes its top-C tokens,
    C = ceil(group_tokens * c / E) (at most the group size); weight S[t, e]. No balance loss
    (balanced by construction). Optional `max_experts_per_token` keeps a token's best picks."""

    def picks_per_expert(self, gs: int) -> int:
        return min(gs, max(1, math.ceil(gs * self.cfg.capacity_factor / self.num_experts)))

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, E = logits.shape
        G = T // gs
        C = self.picks_per_expert(gs)
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        scores = probs.view(G, gs, E).transpose(1, 2)  # [G, E, gs]
        top_s, top_t = scores.topk(C, dim=-1)  # [G, E, C]
        base = (torch.arange(G, device=logits.device) * gs).view(G, 1, 1)
        token = (top_t + base).flatten()
        expert = torch.arange(E, device=logits.device).view(1, E, 1).expand(G, E, C).flatten()
        weight = top_s.flatten()
        keep = torch.ones_like(token, dtype=torch.bool)
        if self.cfg.max_experts_per_token is not None:
            keep = keep_within_capacity(token, weight.detach(), self.cfg.max_experts_per_token, T)
        losses = self.z_loss_term(logits)
        return Assignment.from_slots(token, expert, weight, keep, T, E, losses)
