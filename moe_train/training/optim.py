"""The optimizer (AdamW or Adafactor over dense/expert x decay/no-decay groups), its schedule, the precision."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from ..parallel import is_expert_param
from .adafactor import Adafactor


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr. A pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (or Adafactor, optim.name) over four groups: dense/expert x decay/no-decay (experts in
    their own groups, so engines that shard or reduce per group treat them per expert group, and
    Adafactor takes its statistics per expert)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}  # (expert, decay) -> params
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((is_expert_param(p), p.dim() >= 2), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "moe": expert}
        for (expert, decay), ps in sorted(groups.items())
    ]
    if cfg.name == "adafactor":
        return Adafactor(param_groups, lr=cfg.lr, beta2_decay=cfg.beta2_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise RuntimeError(
                "optim.impl=apex needs NVIDIA apex (it ships in NVIDIA's PyTorch containers and the "
                "moe-train Docker image); use optim.impl=torch elsewhere"
            ) from e
        return FusedAdam(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adam_w_mode=True)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **fast)
