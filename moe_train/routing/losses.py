"""Auxiliary router losses (unscaled; routers multiply by their coefficients)."""

from __future__ import annotations

import torch
from torch import Tensor


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [..., E]."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def balance_loss(probs: Tensor, choice: Tensor, group_size: int) -> Tensor:
    """Switch balance loss E * sum_i f_i * P_i, per routing group, averaged over groups.

    probs:  [T, E] router probabilities
    choice: [T] expert each token picked (before capacity)
    f_i: fraction of the group's tokens that picked i; P_i: mean probability of i in the group.
    """
    T, E = probs.shape
    G = T // group_size
    P = probs.view(G, group_size, E).mean(dim=1)  # [G, E]
    group = torch.arange(T, device=probs.device) // group_size
    counts = torch.zeros(G * E, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, group * E + choice, torch.ones_like(choice, dtype=probs.dtype))
    f = counts.view(G, E) / group_size
    return (E * (f * P).sum(dim=1)).mean()
