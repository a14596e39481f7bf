"""Router configuration: one dataclass for every router kind.

The checks common to every kind live here; what a kind needs of its own fields (SAM's groups, the
prototypes' divisibility, the tree's depth) is its class's `check_config`, found through the
registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import above, at_least, check_finite, in_range, one_of
from .registry import router_class

DROP_POLICIES = ("score", "position")
NORMALIZE = ("before_drop", "after_drop")
SCORES = ("softmax", "sigmoid")
# the current generation's options and their 'off' value; a kind takes those in its modern_options
MODERN_OPTIONS = {
    "score": "softmax",
    "normalize_topk": True,
    "route_scale": 1.0,
    "bias_update_rate": 0.0,
    "topk_groups": None,
}


@dataclass
class RouterConfig:
    """How tokens choose experts. Every field has a default; `validate` checks combinations.

    kind: a registered router (switch | topk | prototype | sam | expert_choice | tree built in).
    top_k: experts per token (topk, sam), prototypes (prototype). Ignored by switch.
    num_groups: expert groups G of E/G consecutive experts each: SAM's device groups, and topk's
        groups when topk_groups is set (DeepSeek-V3 n_group).
    topk_groups: topk only: group-limited routing (DeepSeek-V3 topk_group): each token scores the
        num_groups groups (sum of each group's top-2 choice scores), keeps the best topk_groups
        and takes its top_k inside them; None = no group limit (num_groups unused by topk).
    score: topk only: `softmax` over the experts, or an independent `sigmoid` per expert
        (DeepSeek-V3 scoring_func). The chosen scores are the weights (renormalised when
        normalize_topk). The other kinds need a softmax (their class says why).
    normalize_topk: topk only: divide the chosen weights by their sum (HF norm_topk_prob); false
        keeps the raw scores. `normalize` says over which slots the sum runs.
    route_scale: a constant factor on topk's combine weights, after any renormalisation
        (DeepSeek-V3 routed_scaling_factor, 2.5 there).
    bias_update_rate: topk only: aux-loss-free balancing (arXiv 2408.15664, DeepSeek-V3
        e_score_correction_bias). A per-expert float32 bias is added to the scores that choose
        (never to the weights); after each applied optimizer step it moves by
        rate * sign(mean load - load), the load counted over the whole global batch. 0 = off.
    capacity_factor: slots per expert = ceil(tokens * k / E * capacity_factor); None = dropless.
        For expert_choice it is c in C = T * c / E (the paper uses 2) and may not be None.
        Applies in training forwards; eval-mode forwards use eval_capacity_factor.
    eval_capacity_factor: the capacity factor of eval-mode forwards (training's periodic
        validation, moe-train-eval, generation); None = dropless, so a model is scored as a
        server runs it (DeepSpeed's name). expert_choice: None = capacity_factor (it has no
        dropless form: c is how many tokens each expert picks).
    drop_policy: which slots an over-full expert keeps: by router `score` or by token `position`.
    normalize: topk with normalize_topk only: renormalise the k weights `before_drop` (GShard/lingvo: a token whose
        2nd choice is dropped keeps g1/(g1+g2)) or `after_drop` over the surviving slots
        (DeepSpeed, fairscale: a lone survivor gets weight 1.0). See docs/ROUTING.md.
    group_size: tokens per routing group (capacity, expert choice picks and balance statistics are
        computed per group); None = all tokens of the call.
    jitter_eps: multiplicative input noise U[1-eps, 1+eps] in training; None = 0.01 for switch,
        0 for the others.
    random_routing: GShard's random 2nd expert (kept if 2 * g2 > U(0,1)); None = on when top_k == 2.
    """

    kind: str = "switch"
    top_k: int = 2
    num_groups: int = 1
    topk_groups: int | None = None
    score: str = "softmax"
    normalize_topk: bool = True
    route_scale: float = 1.0
    bias_update_rate: float = 0.0
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    drop_policy: str = "score"
    normalize: str = "before_drop"
    group_size: int | None = None
    z_loss_coef: float = 1e-3  # router z-loss weight (ST-MoE): mean squared logsumexp of the logits
    balance_coef: float = 1e-2  # load-balancing loss weight (alpha of Switch/GShard)
    alignment_coef: float = 1e-2  # SAM's alignment loss weight
    jitter_eps: float | None = None
    random_routing: bool | None = None
    init_scale: float = 0.1  # gate init: truncated normal with std sqrt(init_scale / d_model)
    max_experts_per_token: int | None = None  # expert_choice: cap on experts per token; null = none
    tree_depth: int = 2  # tree: sign bits (depth) of the gating; 2^(depth+1)-1 node experts
    tree_gate: str = "straight_through"  # tree: straight_through | sigmoid (see routing/tree.py)
    router_dtype: str = "float32"  # router math precision: always float32

    @property
    def effective_jitter(self) -> float:
        if self.jitter_eps is not None:
            return self.jitter_eps
        return router_class(self.kind).default_jitter_eps

    @property
    def effective_random_routing(self) -> bool:
        if self.random_routing is not None:
            return self.random_routing
        return router_class(self.kind).default_random_routing(self)

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor of a training (capacity_factor) or eval-mode forward
        (eval_capacity_factor); None = dropless. expert_choice reads its own (its class)."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def experts_per_token(self) -> float:
        """Experts a token runs through on average before capacity (k for token choice; c for
        expert choice). Delegates to the router class."""
        return router_class(self.kind).experts_per_token(self)

    def num_experts_for(self, num_experts: int) -> int:
        """Experts per MoE layer for `model.num_experts` (the tree fixes its own count)."""
        return router_class(self.kind).num_experts_for(self, num_experts)

    def validate(self, num_experts: int) -> None:
        """Raise ValueError naming the field for invalid values or combinations."""
        cls = router_class(self.kind)  # router.kind: got ...; allowed: ...
        check_finite(self, "router")
        one_of(self, "router", "drop_policy", DROP_POLICIES)
        one_of(self, "router", "normalize", NORMALIZE)
        one_of(self, "router", "score", SCORES)
        for name, off in MODERN_OPTIONS.items():
            if getattr(self, name) != off and name not in cls.modern_options:
                why = cls.softmax_reason if name == "score" else "it is topk's option"
                raise ValueError(
                    f"router.{name}: router.kind={self.kind} does not take {name}="
                    f"{getattr(self, name)!r} ({why}); use router.kind=topk, or {name}={off!r}"
                )
        above(self, "router", 0, "route_scale")
        at_least(self, "router", 0, "bias_update_rate")
        if self.router_dtype != "float32":
            raise ValueError(
                "router.router_dtype: router math is always float32 (selective precision)"
            )
        if num_experts < 1:
            raise ValueError(f"router.num_experts: must be >= 1, got {num_experts}")
        above(self, "router", 0, "capacity_factor", "eval_capacity_factor", optional=True)
        at_least(self, "router", 0, "z_loss_coef", "balance_coef", "alignment_coef", "init_scale")
        in_range(self, "router", 0, 1, "jitter_eps", optional=True)
        at_least(self, "router", 1, "top_k")
        at_least(self, "router", 1, "group_size", "max_experts_per_token", optional=True)
        cls.check_config(self, num_experts)
