"""Helpers of the 'use your model' tests: compose a training config, call a console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_train.config import CONFIG_DIR, TrainConfig, register_configs

SMALL_CORPUS = "data.default_corpus_bytes=400000"


def compose_cfg(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        dcfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "model=tiny", "trainer=ci", f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}",
        SMALL_CORPUS, *extra,
    ]  # fmt: skip


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moe_train.<module> args` (what the console scripts run), e.g. module
    "inference.generate"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"moe_train.{module}", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
