"""The body's parameter holders, each owning its init rule (`init_value`, see moe_train.init):
bias-free Linear, Embedding, LayerNorm and RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def reset_by_rule(module: nn.Module) -> None:
    """A module's own parameters by its `init_value`, from the global RNG; nothing on meta (inside
    a model: moe_train.init draws every value once, from its layout-invariant key)."""
    for name, p in module.named_parameters(recurse=False):
        if not p.is_meta:
            p.copy_(module.init_value(name, p.shape))  # type: ignore[operator]


class NormalInit(nn.Module):
    """The rule of Linear and Embedding: every value normal(0, init_std), set by the subclass
    before the torch module's __init__ (which calls reset_parameters)."""

    init_std: float

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randn(shape, generator=generator) * self.init_std

    def reset_parameters(self) -> None:
        reset_by_rule(self)


class Linear(NormalInit, nn.Linear):
    """A bias-free nn.Linear whose weight starts normal(0, init_std); the module that holds it
    chooses init_std (output projections: ModelConfig.output_init_std)."""

    def __init__(self, d_in: int, d_out: int, init_std: float):
        self.init_std = init_std  # set first: nn.Linear.__init__ calls reset_parameters
        super().__init__(d_in, d_out, bias=False)


class Embedding(NormalInit, nn.Embedding):
    """nn.Embedding whose table starts normal(0, init_std) (not torch's normal(0, 1))."""

    def __init__(self, num: int, dim: int, init_std: float):
        self.init_std = init_std  # set first: nn.Embedding.__init__ calls reset_parameters
        super().__init__(num, dim)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (GPT-2's body): weight 1, bias 0 (its rule, as an init_value)."""

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)

    def reset_parameters(self) -> None:
        reset_by_rule(self)


class RMSNorm(nn.Module):
    """Weight-only RMSNorm computed in float32, as HF Llama/Mixtral/Qwen3:
    y = weight * (x / sqrt(mean(x^2) + eps)) with the normalisation in float32, cast back to x's
    dtype before the weight. x: [..., dim]. Weight starts at 1."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.ones(shape)

    def reset_parameters(self) -> None:
        reset_by_rule(self)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # [..., dim]; HF's expression (faster on CPU than F.rms_norm's backward)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """model.norm: `rmsnorm` (weight only) or `layernorm` (weight and bias) over `dim`."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else LayerNorm(dim, eps=eps)
