"""Training runs in tests: compose a config as `moe-train` would, the tiny model's overrides, the
losses a run logged, a console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_train.config import CONFIG_DIR, TrainConfig, register_configs
from moe_train.metrics import read_metrics

SMALL_CORPUS = "data.default_corpus_bytes=400000"


def compose_cfg(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        dcfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "model=tiny", "trainer=ci", f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}",
        SMALL_CORPUS, *extra,
    ]  # fmt: skip


def tiny_cfg(run_dir: Path, cache: str, *extra: str) -> TrainConfig:
    """model=tiny, trainer=ci on a small default corpus cached in `cache`."""
    return compose_cfg(*tiny_overrides(run_dir, Path(cache), *extra))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> the train loss metrics.jsonl holds."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moe_train.<module> args` (what the console scripts run), e.g. module
    "inference.generate"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"moe_train.{module}", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
