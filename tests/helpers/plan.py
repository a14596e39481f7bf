"""Shared configs of the planner tests (imported by the test modules of this folder)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moe_train.model import ModelConfig
from moe_train.plan import PlanOptions

ROOT = Path(__file__).resolve().parents[2]
FAST = PlanOptions(meta_check=False, compare_routers=False)

SMALL = ModelConfig(
    vocab_size=50, seq_len=16, d_model=16, n_layers=3, n_heads=2, d_ff=24, num_experts=8
)


def model_cfg(name: str) -> ModelConfig:
    node = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
