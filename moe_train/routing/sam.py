"""SAM: Switch-and-Mixture routing (Jiang et al. 2021, arXiv 2110.07431)."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .losses import balance_loss


class SAMRouter(Router):
    """One gate g = softmax(W x + b) over E experts grouped into G devices of E/G.

    Switch router: d* = argmax_d sum_{e in d} g_e. Mixture router: top-k experts by g inside d*.
    y = sum_j g_{e_j} E_{e_j}(x) with raw probabilities. Losses: balance summed over the k choices,
    and alignment = mean_t sum_{e not in d*} max(0, g_e - g_{e_k}) with e_k the weakest chosen
    expert (its probability detached, so only the out-of-device experts get the gradient).
    Every token's experts sit in one group, so it crosses the network once.
    """

    gate_bias = True

    def route(self, logits: Tensor, gs: int) -> Assignment:
        T, E = logits.shape
        k, G = self.cfg.top_k, self.cfg.num_groups
        n = E // G
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        grouped = probs.view(T, G, n)
        device_choice = grouped.sum(dim=-1).argmax(dim=-1)  # [T]
        in_group = grouped.gather(1, device_choice.view(T, 1, 1).expand(T, 1, n)).squeeze(
            1
        )  # [T, n]
        top_p, top_local = in_group.topk(k, dim=-1)  # [T, k]
        expert = device_choice.unsqueeze(1) * n + top_local  # [T, k]
        token = torch.arange(T, device=logits.device).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=logits.device).expand(T, k)

        balance = sum(balance_loss(probs, expert[:, j], gs) for j in range(k))
        outside = torch.ones(T, G, dtype=torch.bool, device=logits.device)
        outside[torch.arange(T, device=logits.device), device_choice] = False
        outside = outside.repeat_interleave(n, dim=1)  # [T, E]
        weakest = top_p[:, -1:].detach()  # [T, 1]
        alignment = (torch.relu(probs - weakest) * outside).sum(dim=-1).mean()
        losses = {
            "balance": self.cfg.balance_coef * balance,
            "alignment": self.cfg.alignment_coef * alignment,
        }
        losses.update(self.z_loss_term(logits))

        token, expert, w, choice = (
            token.flatten(),
            expert.flatten(),
            top_p.flatten(),
            choice.flatten(),
        )
        keep = self.keep(
            token, expert, self.priority(w, token, choice, T), gs, self.capacity(gs, k)
        )
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)
