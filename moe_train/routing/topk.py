"""GShard top-k routing (Lepikhin et al. 2020)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..ops.indexing import count_values
from .assignment import Assignment
from .base import Router
from .config import MODERN_OPTIONS, RouterConfig
from .context import RouteContext
from .groups import limit_to_groups
from .losses import balance_loss
from .noise import RANDOM_ROUTING_STREAM
from .ranks import distinct_pick_ranks, miss_probability
from .registry import register_router
from .select import topk_lowest_index


@register_router("topk")
class TopKRouter(Router):
    """Top-k of the scores s = softmax(logits) or sigmoid(logits) (router.score; ties: the lowest
    expert ids). The choice may add the balancing bias (router.bias_update_rate) and be limited
    to the best router.topk_groups of router.num_groups groups; the weights are the chosen
    unbiased scores, renormalised over the k (router.normalize_topk, GShard) or not, times
    router.route_scale. GShard's random routing drops the j-th choice (j >= 2) unless
    k * w_j > U(0,1) (for k=2: 2 * g2 > U); aux loss on 1st choices (sigmoid: on s / sum s, as
    DeepSeek-V3's sequence-wise loss). `router.normalize` says whether the renormalisation is
    over the k choices (before_drop, the default) or over the slots that survive random routing
    and capacity (after_drop)."""

    compare_as = {"top_k": 2}
    modern_options = frozenset(MODERN_OPTIONS)

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if cfg.top_k > num_experts:
            raise ValueError(f"router.top_k: top_k={cfg.top_k} exceeds num_experts={num_experts}")
        if cfg.topk_groups is not None:
            check_groups(cfg, num_experts)
        if cfg.top_k == 1 and cfg.normalize_topk:
            warnings.warn(
                "router.top_k: topk with top_k=1 renormalises the one weight to 1.0, so the gate "
                "gets no gradient through the combine weights; use router.kind=switch "
                "(weight = its probability) or router.normalize_topk=false",
                UserWarning,
                stacklevel=2,
            )

    @classmethod
    def check_layout(cls, cfg: RouterConfig, ep: int) -> None:
        """Group-limited routing needs groups that are whole ranks' experts (a rank holds whole
        groups, or a group is a whole number of ranks: a node's), so a token reaches at most
        topk_groups ranks (or nodes)."""
        G = cfg.num_groups
        if cfg.topk_groups is not None and G % ep and ep % G:
            raise ValueError(
                f"router.num_groups={G} does not fit parallel.ep={ep}: group-limited routing "
                "needs each rank to hold whole groups (num_groups a multiple of ep) or each group "
                "to be whole ranks (ep a multiple of num_groups); e.g. router.num_groups=ep"
            )

    @classmethod
    def default_random_routing(cls, cfg: RouterConfig) -> bool:
        return cfg.top_k == 2

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        if cfg.topk_groups is None:
            return distinct_pick_ranks(num_experts, ep, cfg.top_k)
        return group_limited_ranks(num_experts, cfg.num_groups, cfg.topk_groups, ep, cfg.top_k)

    def scores(self, logits: Tensor) -> Tensor:
        """[T, E] float32 expert scores: softmax over the experts or a sigmoid each."""
        if self.cfg.score == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def choose(self, scores: Tensor) -> Tensor:
        """[T, k] experts: top-k of the scores plus the balancing bias (detached), inside the
        token's best groups when group-limited."""
        choice = scores.detach()
        if self.score_bias is not None:
            choice = choice + self.score_bias.float()
        if self.cfg.topk_groups is not None:
            choice = limit_to_groups(choice, self.cfg.num_groups, self.cfg.topk_groups)
        experts = topk_lowest_index(choice, self.cfg.top_k)[1]  # [T, k]
        self.last_choice_load = count_values(experts.flatten(), scores.shape[1])
        return experts

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        k = self.cfg.top_k
        dev = logits.device
        probs = self.scores(logits)  # [T, E]
        top_e = self.choose(probs)  # [T, k]
        top_p = probs.gather(1, top_e)  # [T, k] the unbiased scores carry the gradient
        normalize = self.cfg.normalize_topk
        weight = top_p / top_p.sum(dim=-1, keepdim=True) if normalize else top_p
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
        if normalize and self.cfg.normalize == "after_drop":
            w = renormalise_kept(p, token, keep, T)
        if self.cfg.route_scale != 1.0:
            w = w * self.cfg.route_scale
        balance_p = probs if self.cfg.score == "softmax" else probs / probs.sum(-1, keepdim=True)
        losses = {
            "balance": self.cfg.balance_coef * balance_loss(balance_p, top_e[:, 0], ctx.group_size)
        }
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)


def check_groups(cfg: RouterConfig, num_experts: int) -> None:
    """router.num_groups / topk_groups / top_k of group-limited routing (errors name the field)."""
    E, G, g = num_experts, cfg.num_groups, cfg.topk_groups
    if g is None:  # not group-limited
        return
    if G < 1 or E % G:
        raise ValueError(
            f"router.num_groups: group-limited routing needs num_experts ({E}) divisible by "
            f"num_groups ({G})"
        )
    if not 1 <= g <= G:
        raise ValueError(
            f"router.topk_groups: topk_groups={g} must be in [1, num_groups={G}] (the groups "
            "a token may use)"
        )
    if cfg.top_k > g * (E // G):
        raise ValueError(
            f"router.top_k: top_k={cfg.top_k} exceeds the experts of topk_groups={g} groups "
            f"({g} x {E // G}); raise router.topk_groups or lower router.top_k"
        )


def group_limited_ranks(num_experts: int, num_groups: int, keep: int, ep: int, k: int) -> float:
    """Expected distinct ep-ranks of a token under uniform group-limited routing: `keep` of G
    groups uniformly, then k distinct experts uniformly among their keep * E/G experts. At most
    `keep` ranks when ranks hold whole groups; a group of ep/G ranks (a node) spreads its picks."""
    G, n = num_groups, num_experts // num_groups
    if ep % G == 0:  # each group is r = ep/G whole ranks: k picks among keep * r ranks
        return distinct_pick_ranks(keep * n, keep * (ep // G), k)
    per_rank = G // ep  # groups per rank
    touched = 1 - miss_probability(keep * n, n, k)  # P(a chosen group gets >= 1 of the k)
    miss = 0.0  # P(a given rank receives nothing)
    for j in range(min(per_rank, keep) + 1):  # j of its groups chosen (hypergeometric)
        p_j = math.comb(per_rank, j) * math.comb(G - per_rank, keep - j) / math.comb(G, keep)
        miss += p_j * (1 - touched) ** j
    return ep * (1 - miss)


def renormalise_kept(p: Tensor, token: Tensor, keep: Tensor | None, num_tokens: int) -> Tensor:
    """p / (sum of p over the token's kept slots (all when keep is None)), [S]; entries of dropped
    slots are finite and unused (the denominator is clamped, so no 0/0 reaches the graph)."""
    denom = torch.zeros(num_tokens, dtype=p.dtype, device=p.device)
    kept_p = p if keep is None else torch.where(keep, p, torch.zeros_like(p))
    denom = denom.index_add(0, token, kept_p)  # [T]
    return p / denom.clamp_min(torch.finfo(p.dtype).tiny)[token]
