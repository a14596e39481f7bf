"""Shared configs of the planner tests (imported by the test modules of this folder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moe_train.config import TrainConfig
from moe_train.model import ModelConfig
from moe_train.plan import PlanOptions
from moe_train.routing import RouterConfig

ROOT = Path(__file__).resolve().parents[2]
FAST = PlanOptions(meta_check=False, compare_routers=False)

SMALL = ModelConfig(
    vocab_size=50, seq_len=16, d_model=16, n_layers=3, n_heads=2, d_ff=24, num_experts=8
)


def model_cfg(name: str) -> ModelConfig:
    node = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def train_cfg(
    *,
    model: ModelConfig = SMALL,
    router: RouterConfig | None = None,
    parallel: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
) -> TrainConfig:
    """The trainer's TrainConfig of `model` and `router` with some fields of its parallel,
    trainer and optim sections replaced ({"ep": 4} = parallel.ep=4)."""
    cfg = TrainConfig(model=model, router=router or RouterConfig())
    return replace(
        cfg,
        parallel=replace(cfg.parallel, **(parallel or {})),
        trainer=replace(cfg.trainer, **(trainer or {})),
        optim=replace(cfg.optim, **(optim or {})),
    )
