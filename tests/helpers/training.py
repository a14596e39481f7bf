"""A small real model's training config, engine and batch plan for the tests of the loop's parts."""

from __future__ import annotations

from moe_train.config import TrainConfig
from moe_train.model import ModelConfig
from moe_train.parallel import ParallelConfig, ParallelState
from moe_train.training.batches import BatchPlan
from moe_train.training.build import build_engine

SEQ_LEN = 16


def small_cfg(precision: str = "fp32") -> TrainConfig:
    cfg = TrainConfig(seed=5)
    cfg.model = ModelConfig(
        seq_len=SEQ_LEN, d_model=32, n_layers=1, n_heads=2, d_ff=64, num_experts=4, moe_every=1
    )
    cfg.trainer.precision = precision
    return cfg


def engine_and_plan(cfg: TrainConfig, micro: int = 2, accum: int = 2):
    parallel = ParallelState(ParallelConfig())
    engine = build_engine(cfg, parallel, micro, accum)
    plan = BatchPlan(cfg.seed, micro * accum, SEQ_LEN, micro, accum, 0, 1, parallel.device)
    return engine, plan
