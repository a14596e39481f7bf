"""The router base: a float32 gate, routing groups, noise, and the facts every kind answers.

Subclasses implement `route(logits, ctx)` and override the class-level facts that differ from the
defaults here (the planner, the parallel layout checks and the benchmarks read them through
`registry.router_class(kind)`, never by comparing kind strings).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.hashing import Seed
from .assignment import Assignment
from .capacity import expert_capacity, keep_within_capacity
from .config import RouterConfig
from .context import RouteContext, RouteKey
from .losses import z_loss
from .noise import jitter_seed


class Router(nn.Module):
    """tokens x: [T, d] -> Assignment. Pure tensor math, no communication.

    The gate weight is kept in float32 and the routing math runs in float32 with autocast off,
    whatever the model's precision (Switch's selective precision).
    """

    kind: ClassVar[str] = ""  # set by @register_router
    gate_bias: ClassVar[bool] = False
    default_jitter_eps: ClassVar[float] = 0.0  # input jitter when router.jitter_eps is null
    aux_losses: ClassVar[tuple[str, ...]] = ("balance",)  # loss names besides "z"
    # fields the planner's router comparison sets for this kind; None: not compared
    compare_as: ClassVar[dict[str, Any] | None] = {}
    # a token's experts depend only on that token (capacity aside), so a KV-cached decoder can
    # route each new token alone; False when tokens compete for experts (expert choice)
    causal: ClassVar[bool] = True
    # the RouterConfig.MODERN_OPTIONS this kind takes (topk: all); the others keep their 'off'
    modern_options: ClassVar[frozenset[str]] = frozenset()
    softmax_reason: ClassVar[str] = "its rule is defined on a softmax over the experts"

    # ---- facts about the kind (classmethods of the config; no module needed) ---------------
    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        """Raise ValueError naming the field for values this kind cannot route with."""

    @classmethod
    def check_layout(cls, cfg: RouterConfig, ep: int) -> None:
        """Raise ValueError when `ep` expert-parallel ranks cannot hold this router's experts."""

    @classmethod
    def layout_fields(cls, cfg: RouterConfig, num_experts: int, ep: int) -> dict[str, Any]:
        """Fields that fit this router to `ep` ranks (SAM: one group per rank)."""
        return {}

    @classmethod
    def num_experts_for(cls, cfg: RouterConfig, num_experts: int) -> int:
        """Experts per MoE layer (the tree fixes its own count)."""
        return num_experts

    @classmethod
    def gate_units(cls, cfg: RouterConfig, num_experts: int) -> int:
        """Outputs of the gate (logits per token)."""
        return num_experts

    @classmethod
    def gate_params(cls, cfg: RouterConfig, d_model: int, num_experts: int) -> int:
        units = cls.gate_units(cfg, num_experts)
        return d_model * units + (units if cls.gate_bias else 0)

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        """Experts a token runs through on average, before capacity (k for token choice)."""
        return cfg.top_k

    @classmethod
    def default_random_routing(cls, cfg: RouterConfig) -> bool:
        """router.random_routing when null."""
        return False

    @classmethod
    def expected_ranks(cls, cfg: RouterConfig, num_experts: int, ep: int) -> float:
        """Expected distinct ep-ranks (each holding E/ep consecutive experts) a token is sent to
        under uniform routing. Default: k independent uniform picks, ep * (1 - (1 - 1/ep)^k)."""
        return ep * (1 - (1 - 1 / ep) ** cls.experts_per_token(cfg))

    # ---- the module --------------------------------------------------------------------------
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__()
        cfg.validate(num_experts)
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        units = type(self).gate_units(cfg, num_experts)
        self.gate = nn.Linear(d_model, units, bias=self.gate_bias, dtype=torch.float32)
        self.generator: torch.Generator | None = None  # seeds training noise without a RouteKey
        self.score_bias: Tensor | None
        if cfg.bias_update_rate > 0:  # aux-loss-free balancing (routing/balancing.py moves it)
            # [E] float32, indexed by global expert id, the same on every rank; checkpointed
            self.register_buffer("score_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.score_bias = None
        # [E] int64 experts chosen (before capacity) in the last call, for the bias update
        self.last_choice_load: Tensor | None = None
        self.reset_parameters()

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        """The initial value of `name` (gate.weight, gate.bias) drawn from `generator`. Switch's
        init: truncated normal (at 2 std), std = sqrt(init_scale / d_model); bias 0."""
        if name == "gate.bias":
            return torch.zeros(shape)
        std = math.sqrt(self.cfg.init_scale / self.d_model)
        weight = torch.empty(shape)
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The gate by `init_value`, from `generator` (default: the global RNG). Nothing on meta
        (a router inside an MoE layer: moe_train.init draws it from its layout-invariant key)."""
        if self.gate.weight.is_meta:
            return
        for name, p in self.named_parameters():
            p.copy_(self.init_value(name, p.shape, generator))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The balancing bias starts at zero (moe_train.init.materialize calls this)."""
        if self.score_bias is not None and not self.score_bias.is_meta:
            self.score_bias.zero_()

    # ---- helpers for subclasses -------------------------------------------------------------
    def group_size(self, T: int, override: int | None = None) -> int:
        gs = self.cfg.group_size or override or T
        if T % gs != 0:
            raise ValueError(
                f"router.group_size: {T} tokens are not a whole number of routing groups of "
                f"{gs}; use a group_size that divides the tokens per call (e.g. the sequence length)"
            )
        return gs

    @property
    def capacity_factor(self) -> float | None:
        """This forward's capacity factor: router.capacity_factor in training,
        router.eval_capacity_factor in eval mode (None = dropless)."""
        return self.cfg.capacity_factor_for(self.training)

    def capacity(self, group_tokens: int, slots_per_token: int) -> int | None:
        cf = self.capacity_factor
        if cf is None:
            return None
        return expert_capacity(group_tokens, slots_per_token, self.num_experts, cf)

    def keep(
        self,
        token: Tensor,
        expert: Tensor,
        priority: Tensor,
        capacity: int | Tensor | None,
        ctx: RouteContext,
    ) -> Tensor | None:
        """Capacity mask [S] for slots (token, expert), per routing group of ctx.group_size;
        None without capacity (dropless: every slot kept, nothing to compact)."""
        if capacity is None:
            return None
        G = ctx.num_groups
        bucket = (token // ctx.group_size) * self.num_experts + expert
        cap = capacity.repeat(G) if isinstance(capacity, Tensor) else capacity
        return keep_within_capacity(bucket, priority, cap, G * self.num_experts)

    def priority(self, score: Tensor, token: Tensor, choice: Tensor | int, T: int) -> Tensor:
        """Slot priority for capacity: the router score, or GShard's position order
        (all first choices before second choices, earlier tokens first)."""
        if self.cfg.drop_policy == "score":
            return score.detach()
        return -(choice * T + token).to(torch.float64)

    def z_loss_term(self, logits: Tensor) -> dict[str, Tensor]:
        """{"z": coef * z_loss} over softmax logits [..., n], or {} when router.z_loss_coef = 0."""
        return {"z": self.cfg.z_loss_coef * z_loss(logits)} if self.cfg.z_loss_coef > 0 else {}

    def loss_names(self) -> tuple[str, ...]:
        return (*self.aux_losses, *(("z",) if self.cfg.z_loss_coef > 0 else ()))

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self, x: Tensor, route_key: RouteKey | None = None, group_size: int | None = None
    ) -> Assignment:
        """x: [T, d]. route_key keys the layout-invariant noise (noise.py): row t is global token
        `route_key.token_offset + t`. Without one, a training router draws a fresh seed from
        `self.generator` (the global RNG when None); an eval router draws no noise. group_size is
        the per-call default (the layer passes the sequence length), used when cfg.group_size is
        None."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"router expects x of shape [T, {self.d_model}], got {tuple(x.shape)}")
        T = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if T == 0:
                return self.empty(self.logits(x32))
            gs = self.group_size(T, group_size)
            if route_key is None:
                route_key = RouteKey(self.fresh_seed() if self.training else 0)
            ctx = RouteContext(T, gs, route_key)
            eps = self.cfg.effective_jitter if self.training else 0.0
            # jitter keyed by (seed, global token, feature), fused into the gate (noise.py)
            seed = jitter_seed(route_key.seed)
            return self.route(self.logits(x32, seed, route_key.token_offset, eps), ctx)

    def fresh_seed(self) -> int:
        """A noise seed for a training call without a RouteKey, from `self.generator`."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def logits(
        self, x32: Tensor, seed: Seed = 0, first_row: int | Tensor = 0, eps: float = 0.0
    ) -> Tensor:
        """Gate logits [T, units] in float32 (even if the module was cast to bf16) of the input
        with multiplicative jitter U[1-eps, 1+eps) (none when eps = 0), see ops.gate."""
        bias = None if self.gate.bias is None else self.gate.bias.float()
        return ops.gate(x32, self.gate.weight.float(), bias, seed, first_row, eps)

    def empty(self, logits: Tensor) -> Assignment:
        """Zero tokens: no slots, and every loss an exact zero that is still connected to the
        gate (backward gives zero gradients, not missing ones)."""
        zero = logits.sum() * 0.0
        none = torch.zeros(0, dtype=torch.int64, device=logits.device)
        losses = {name: zero for name in self.loss_names()}
        return Assignment(none, none, logits.new_zeros(0), 0, self.num_experts, losses)

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:  # pragma: no cover
        raise NotImplementedError
