"""GShard top-k routing (Lepikhin et al. 2020)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .assignment import Assignment
from .base import Router
from .config import RouterConfig
from .context import RouteContext
from .losses import balance_loss
from .noise import RANDOM_ROUTING_STREAM
from .ranks import distinct_pick_ranks
from .registry import register_router
from .select import topk_lowest_index


@register_router("topk")
class TopKRouter(Router):
    """Top-k of softmax (ties: the lowest expert ids), weights renormalised over the k; GShard's
    random routing drops the j-th choice (j >= 2) unless k * w_j > U(0,1) (for k=2: 2 * g2 > U);
    aux loss on 1st choices. `router.normalize` says whether the renormalisation is over the k
    choices (before_drop, the default) or over the slots that survive random routing and
    capacity (after_drop)."""

    compare_as = {"top_k": 2}

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.top_k > num_experts:
            raise ValueError(f"router.top_k: top_k={cfg.top_k} exceeds num_experts={num_experts}")
        if cfg.top_k == 1:
            warnings.warn(
                "router.top_k: topk with top_k=1 renormalises the one weight to 1.0, so the gate "
                "gets no gradient through the combine weights; use router.kind=switch "
                "(weight = its probability)",
                UserWarning,
                stacklevel=2,
            )

    @classmethod
    def default_random_routing(cls, cfg: RouterConfig) -> bool:
        return cfg.top_k == 2

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        return distinct_pick_ranks(num_experts, ep, cfg.top_k)

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        k = self.cfg.top_k
        dev = logits.device
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        top_p, top_e = topk_lowest_index(probs, k)  # [T, k]
        weight = top_p / top_p.sum(dim=-1, keepdim=True)
        token = torch.arange(T, device=dev).unsqueeze(1).expand(T, k)
        choice = torch.arange(k, device=dev).expand(T, k)
        slots = (token, top_e, weight, top_p, choice)
        if self.training and self.cfg.effective_random_routing and k > 1:
            u = ctx.uniform(RANDOM_ROUTING_STREAM, (ctx.token_offset + token) * k + choice)
            routed = (choice == 0) | (k * weight.detach() > u)
            token, expert, w, p, choice = (t[routed] for t in slots)
        else:  # every choice routed: flatten, no compaction (no host sync on a GPU)
            token, expert, w, p, choice = (t.flatten() for t in slots)
        keep = self.keep(
            token,
            expert,
            self.priority(w, token, choice, T),
            self.capacity(ctx.group_size, k),
            ctx,
        )
        if self.cfg.normalize == "after_drop":
            w = renormalise_kept(p, token, keep, T)
        losses = {
            "balance": self.cfg.balance_coef * balance_loss(probs, top_e[:, 0], ctx.group_size)
        }
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)


def renormalise_kept(p: Tensor, token: Tensor, keep: Tensor | None, num_tokens: int) -> Tensor:
    """p / (sum of p over the token's kept slots (all when keep is None)), [S]; entries of dropped
    slots are finite and unused (the denominator is clamped, so no 0/0 reaches the graph)."""
    denom = torch.zeros(num_tokens, dtype=p.dtype, device=p.device)
    kept_p = p if keep is None else torch.where(keep, p, torch.zeros_like(p))
    denom = denom.index_add(0, token, kept_p)  # [T]
    return p / denom.clamp_min(torch.finfo(p.dtype).tiny)[token]
