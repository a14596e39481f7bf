"""Runs the 'use your model' tests share: a tiny model trained 30 steps on a small default corpus
(session-scoped, trained once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_train.train import train
from tests.helpers.runs import compose_cfg, tiny_overrides


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_cache) -> Path:
    """model=tiny trained 30 steps (switch router, byte tokens); checkpoint at step 30."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(compose_cfg(*tiny_overrides(run_dir, corpus_cache, "trainer.max_steps=30")))
    return run_dir
