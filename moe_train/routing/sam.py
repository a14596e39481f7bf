"""SAM: Switch-and-Mixture routing (Jiang et al. 2021, arXiv 2110.07431)."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .config import RouterConfig
from .context import RouteContext
from .groups import best_groups
from .losses import balance_loss
from .ranks import miss_probability
from .registry import register_router
from .select import topk_lowest_index


@register_router("sam")
class SAMRouter(Router):
    """One gate g = softmax(W x + b) over E experts grouped into G devices of E/G.

    Switch router: d* = argmax_d sum_{e in d} g_e. Mixture router: top-k experts by g inside d*
    (ties: the lowest group, the lowest expert ids). y = sum_j g_{e_j} E_{e_j}(x) with raw
    probabilities. Losses: balance summed over the k choices, and alignment =
    mean_t sum_{e not in d*} max(0, g_e - g_{e_k}) with e_k the weakest chosen expert (its
    probability detached, so only the out-of-device experts get the gradient).
    Every token's experts sit in one group, so it crosses the network once.
    """

    gate_bias: ClassVar[bool] = True
    aux_losses: ClassVar[tuple[str, ...]] = ("balance", "alignment")
    compare_as = {"top_k": 2}
    softmax_reason: ClassVar[str] = (
        "its device choice sums a softmax over each group and its alignment loss compares "
        "softmax probabilities; sigmoid group-limited routing is router.kind=topk "
        "router.topk_groups=1"
    )

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        E, G = num_experts, cfg.num_groups
        if G < 1 or E % G != 0:
            raise ValueError(
                f"router.num_groups: SAM needs num_experts ({E}) divisible by num_groups ({G})"
            )
        if cfg.top_k > E // G:
            raise ValueError(
                f"router.top_k: SAM top_k={cfg.top_k} exceeds experts per group ({E}/{G}={E // G})"
            )

    @classmethod
    def check_layout(cls, cfg: RouterConfig, ep: int) -> None:
        """Every rank holds whole groups (num_groups a multiple of ep), so each token has ONE
        destination rank; with groups straddling ranks a token would cross the network up to
        k times, which defeats SAM, so that layout is refused."""
        if cfg.num_groups % ep:
            raise ValueError(
                f"router.num_groups={cfg.num_groups} is not a multiple of parallel.ep={ep}: SAM "
                "needs every rank to hold whole expert groups so each token has one destination "
                "rank; use router.num_groups = parallel.ep (or a multiple of it)"
            )

    @classmethod
    def layout_fields(cls, cfg: RouterConfig, num_experts: int, ep: int) -> dict[str, Any]:
        """One group per rank where ranks hold >= k experts; else the fewest groups that do."""
        E, k = num_experts, cfg.top_k
        groups = max(g for g in range(1, E // k + 1) if E % g == 0 and g <= ep)
        return {"num_groups": groups}

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        group, n = num_experts // cfg.num_groups, num_experts // ep
        if group <= n:  # a group lies inside one rank
            return 1.0
        return (group / n) * (1 - miss_probability(group, n, cfg.top_k))

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        k, G = self.cfg.top_k, self.cfg.num_groups
        n = E // G
        dev = logits.device
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        grouped = probs.view(T, G, n)
        device_choice = best_groups(probs, G, 1).squeeze(1)  # [T]; the first maximal group sum
        index = device_choice.view(T, 1, 1).expand(T, 1, n)
        in_group = grouped.gather(1, index).squeeze(1)  # [T, n]
        top_p, top_local = topk_lowest_index(in_group, k)  # [T, k]
        expert = device_choice.unsqueeze(1) * n + top_local  # [T, k]
        token = torch.arange(T, device=dev).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=dev).expand(T, k)

        gs = ctx.group_size
        balance = cast(Tensor, sum(balance_loss(probs, expert[:, j], gs) for j in range(k)))
        outside = torch.ones(T, G, dtype=torch.bool, device=dev)
        outside[torch.arange(T, device=dev), device_choice] = False
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
        priority = self.priority(w, token, choice, T)
        keep = self.keep(token, expert, priority, self.capacity(gs, k), ctx)
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)
