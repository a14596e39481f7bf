"""The router base: a float32 gate, routing groups, noise. Subclasses implement `route`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assignment import Assignment
from .capacity import expert_capacity, keep_within_capacity
from .config import RouterConfig
from .noise import counter_uniform, mix_seed


class Router(nn.Module):
    """tokens x: [T, d] -> Assignment. Pure tensor math, no communication.

    The gate weight is kept in float32 and the routing math runs in float32 with autocast off,
    whatever the model's precision (Switch's selective precision).
    """

    gate_bias: bool = False

    def __init__(
        self, cfg: RouterConfig, d_model: int, num_experts: int, gate_units: int | None = None
    ):
        super().__init__()
        cfg.validate(num_experts)
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(
            d_model, gate_units or num_experts, bias=self.gate_bias, dtype=torch.float32
        )
        self.generator: torch.Generator | None = None  # seeds noise when no noise_seed is passed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Switch init: truncated normal, std = sqrt(init_scale / fan_in)."""
        std = math.sqrt(self.cfg.init_scale / self.d_model)
        nn.init.trunc_normal_(self.gate.weight, std=std, a=-2 * std, b=2 * std)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    # ---- helpers for subclasses -------------------------------------------------------------
    def group_size(self, T: int, override: int | None = None) -> int:
        gs = self.cfg.group_size or override or T
        if T % gs != 0:
            raise ValueError(
                f"router.group_size: {T} tokens are not a whole number of routing groups of "
                f"{gs}; use a group_size that divides the tokens per call (e.g. the sequence length)"
            )
        return gs

    def capacity(self, group_tokens: int, slots_per_token: int) -> int | None:
        if self.cfg.capacity_factor is None:
            return None
        return expert_capacity(
            group_tokens, slots_per_token, self.num_experts, self.cfg.capacity_factor
        )

    def keep(
        self,
        token: Tensor,
        expert: Tensor,
        priority: Tensor,
        gs: int,
        capacity: int | Tensor | None,
    ) -> Tensor:
        """Capacity mask [S] for slots (token, expert), per routing group of gs tokens."""
        if capacity is None:
            return torch.ones_like(token, dtype=torch.bool)
        G = max(1, (int(token.max()) // gs + 1) if token.numel() else 1)
        bucket = (token // gs) * self.num_experts + expert
        cap = capacity.repeat(G) if isinstance(capacity, Tensor) else capacity
        return keep_within_capacity(bucket, priority, cap, G * self.num_experts)

    def priority(self, score: Tensor, token: Tensor, choice: Tensor | int, T: int) -> Tensor:
        """Slot priority for capacity: the router score, or GShard's position order
        (all first choices before second choices, earlier tokens first)."""
        if self.cfg.drop_policy == "score":
            return score.detach()
        return -(choice * T + token).to(torch.float64)

    def uniform(self, seed: int, stream: int, index: Tensor) -> Tensor:
        return counter_uniform(mix_seed(seed, stream), index)

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        noise_seed: int | None = None,
        token_offset: int = 0,
        group_size: int | None = None,
    ) -> Assignment:
        """x: [T, d]. noise_seed/token_offset key the layout-invariant noise (see noise.py): the
        token at row t is global token `token_offset + t`. group_size is the per-call default (the
        layer passes the sequence length), used when cfg.group_size is None."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"router expects x of shape [T, {self.d_model}], got {tuple(x.shape)}")
        if noise_seed is None:
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self.noise_seed, self.token_offset = noise_seed, token_offset
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            gs = self.group_size(x.shape[0], group_size)
            eps = self.cfg.effective_jitter
            if self.training and eps > 0:
                x32 = x32 * (
                    1 - eps + 2 * eps * self.group_uniform(x32.shape, gs, noise_seed, token_offset)
                )
            bias = None if self.gate.bias is None else self.gate.bias.float()
            logits = F.linear(x32, self.gate.weight.float(), bias)  # float32 even if cast to bf16
            return self.route(logits, gs)

    def group_uniform(self, shape: torch.Size, gs: int, seed: int, token_offset: int) -> Tensor:
        """U[0,1) noise [T, d], one generator per routing group keyed by the group's GLOBAL index,
        so it does not depend on how the batch is split (token_offset: a whole number of groups)."""
        if token_offset % gs:
            raise ValueError(
                f"token_offset={token_offset} is not a whole number of routing groups of {gs} "
                "tokens; split batches at routing-group (sequence) boundaries"
            )
        T, d = shape
        first = token_offset // gs
        device = self.gate.weight.device
        out = torch.empty(T // gs, gs, d, device=device)
        for g in range(T // gs):  # a loop over routing groups (sequences), never over tokens
            gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 1, first + g))
            torch.rand(gs, d, generator=gen, device=device, out=out[g])
        return out.view(T, d)

    def route(self, logits: Tensor, gs: int) -> Assignment:  # pragma: no cover - abstract
        raise NotImplementedError

    def z_loss_term(self, logits: Tensor) -> dict[str, Tensor]:
        from .losses import z_loss

        return {"z": self.cfg.z_loss_coef * z_loss(logits)} if self.cfg.z_loss_coef > 0 else {}
