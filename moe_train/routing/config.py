"""Router configuration: one dataclass for every router kind."""

from __future__ import annotations

from dataclasses import dataclass

ROUTER_KINDS = ("switch", "topk", "prototype", "sam", "expert_choice", "tree")
DROP_POLICIES = ("score", "position")
TREE_GATES = ("straight_through", "sigmoid")


@dataclass
class RouterConfig:
    """How tokens choose experts. Every field has a default; `validate` checks combinations.

    kind: switch | topk | prototype | sam | expert_choice | tree
    top_k: experts per token (topk, sam), prototypes (prototype). Ignored by switch.
    num_groups: SAM device groups G; E/G experts each.
    capacity_factor: slots per expert = ceil(tokens * k / E * capacity_factor); None = dropless.
        For expert_choice it is c in C = T * c / E (the paper uses 2) and may not be None.
    drop_policy: which slots an over-full expert keeps: by router `score` or by token `position`.
    group_size: tokens per routing group (capacity, expert choice picks and balance statistics are
        computed per group); None = all tokens of the call.
    jitter_eps: multiplicative input noise U[1-eps, 1+eps] in training; None = 0.01 for switch,
        0 for the others.
    random_routing: GShard's random 2nd expert (kept if 2 * g2 > U(0,1)); None = on when top_k == 2.
    """

    kind: str = "switch"
    top_k: int = 2
    num_groups: int = 1
    capacity_factor: float | None = 1.25
    drop_policy: str = "score"
    group_size: int | None = None
    z_loss_coef: float = 1e-3
    balance_coef: float = 1e-2
    alignment_coef: float = 1e-2
    jitter_eps: float | None = None
    random_routing: bool | None = None
    init_scale: float = 0.1
    max_experts_per_token: int | None = None
    tree_depth: int = 2
    tree_gate: str = "straight_through"
    router_dtype: str = "float32"

    @property
    def effective_jitter(self) -> float:
        if self.jitter_eps is not None:
            return self.jitter_eps
        return 0.01 if self.kind == "switch" else 0.0

    @property
    def effective_random_routing(self) -> bool:
        if self.random_routing is not None:
            return self.random_routing
        return self.kind == "topk" and self.top_k == 2

    def experts_per_token(self) -> int:
        """k: slots per token for token-choice routers (upper bound for expert choice)."""
        return {
            "switch": 1,
            "topk": self.top_k,
            "prototype": self.top_k,
            "sam": self.top_k,
            "tree": self.tree_depth + 1,
        }.get(self.kind, self.top_k)

    def num_experts_for(self, num_experts: int) -> int:
        """The tree fixes its own expert count: 2^(depth+1) - 1 node experts."""
        if self.kind == "tree":
            return 2 ** (self.tree_depth + 1) - 1
        return num_experts

    def validate(self, num_experts: int) -> None:
        """Raise ValueError naming the field for invalid values or combinations."""
        E = num_experts

        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"router.{field}: {msg}")

        if self.kind not in ROUTER_KINDS:
            raise bad("kind", f"got {self.kind!r}; allowed: {', '.join(ROUTER_KINDS)}")
        if self.drop_policy not in DROP_POLICIES:
            raise bad("drop_policy", f"got {self.drop_policy!r}; allowed: score, position")
        if self.tree_gate not in TREE_GATES:
            raise bad("tree_gate", f"got {self.tree_gate!r}; allowed: {', '.join(TREE_GATES)}")
        if self.router_dtype != "float32":
            raise bad("router_dtype", "router math is always float32 (selective precision)")
        if E < 1:
            raise bad("num_experts", f"must be >= 1, got {E}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad(
                "capacity_factor", f"must be > 0 or null (dropless), got {self.capacity_factor}"
            )
        if self.kind == "expert_choice" and self.capacity_factor is None:
            raise bad(
                "capacity_factor", "expert_choice needs a capacity factor c (C = T*c/E), e.g. 2.0"
            )
        for name in ("z_loss_coef", "balance_coef", "alignment_coef", "init_scale"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.jitter_eps is not None and not 0 <= self.jitter_eps < 1:
            raise bad("jitter_eps", f"must be in [0, 1), got {self.jitter_eps}")
        if self.group_size is not None and self.group_size < 1:
            raise bad("group_size", f"must be >= 1 or null, got {self.group_size}")
        if self.top_k < 1:
            raise bad("top_k", f"must be >= 1, got {self.top_k}")
        if self.kind == "topk" and self.top_k > E:
            raise bad("top_k", f"top_k={self.top_k} exceeds num_experts={E}")
        if self.kind == "prototype" and E % self.top_k != 0:
            raise bad(
                "top_k", f"prototype needs num_experts ({E}) divisible by top_k ({self.top_k})"
            )
        if self.kind == "sam":
            if self.num_groups < 1 or E % self.num_groups != 0:
                raise bad(
                    "num_groups",
                    f"SAM needs num_experts ({E}) divisible by num_groups ({self.num_groups})",
                )
            if self.top_k > E // self.num_groups:
                raise bad(
                    "top_k",
                    f"SAM top_k={self.top_k} exceeds experts per group "
                    f"({E}/{self.num_groups}={E // self.num_groups})",
                )
        if self.kind == "tree" and not 1 <= self.tree_depth <= 12:
            raise bad("tree_depth", f"must be in [1, 12], got {self.tree_depth}")
        if self.max_experts_per_token is not None and self.max_experts_per_token < 1:
            raise bad(
                "max_experts_per_token", f"must be >= 1 or null, got {self.max_experts_per_token}"
            )
