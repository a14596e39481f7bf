"""Rotary position embedding (RoPE, Su et al. 2021, arXiv 2104.09864) in the rotate-half layout of
HF Llama / Mixtral / Qwen: channel i of a head's first half pairs with channel i + head_dim/2.

    inv_freq[i] = theta^(-2i / head_dim)            i < head_dim / 2
    angle[t, i] = t * inv_freq[i]                   (float32)
    rope(x)[t]  = x[t] * cos(angle) + rotate_half(x[t]) * sin(angle),
                  rotate_half([x1, x2]) = [-x2, x1], the angles repeated over both halves

The cos/sin tables are non-persistent buffers (never in a checkpoint), recomputed by
`reset_buffers` (moe_train.init.materialize calls it after `to_empty`, so a model built on meta
never keeps garbage tables).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_tables(
    positions: int, head_dim: int, theta: float, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(cos, sin) [positions, head_dim] float32 on `device`, the angles repeated over both
    halves; HF's arithmetic (inv_freq from an int64 arange, angles as a float32 outer product)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim / 2]
    steps = torch.arange(positions, dtype=torch.int64, device=device).float()
    angle = steps[:, None] * inv_freq[None]
    angle = torch.cat((angle, angle), dim=-1)  # [positions, head_dim]
    return angle.cos(), angle.sin()


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, heads, hd]; cos, sin: [T, hd] (every row at the same positions) or [B, T, hd]
    (per-row positions: document masking) -> x rotated, in x's dtype, in one expression:
    x cos + rotate_half(x) sin (on CPU faster than rotating the two halves as strided views)."""
    c, s = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)  # [(B,) T, 1, hd]
    return x * c + rotate_half(x) * s


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of positions [0, max_len) for heads of `head_dim` (no parameters)."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the tables in place (nothing on meta)."""
        if self.cos.is_meta:
            return
        # the device named: a caller's `with torch.device("meta")` may still be active (torch 2.7)
        cos, sin = rope_tables(self.max_len, self.head_dim, self.theta, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) [length, head_dim] of positions start .. start + length - 1, float32."""
        end = start + length
        return self.cos[start:end].float(), self.sin[start:end].float()

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [B, T, head_dim] float32 of per-row positions [B, T] (each < max_len)."""
        return self.cos[positions].float(), self.sin[positions].float()
