"""Run `moe-train` on the tiny model for parity tests (1 process or N gloo ranks under torchrun),
and cache 1-process loss curves so that several tests compare against one reference run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moe_train.metrics import read_metrics

STEPS = 20


def run(tmp_path: Path, run_dir: Path, nproc: int, overrides: list[str]) -> list[float]:
    """Per-step training losses of `moe-train model=tiny trainer=ci <overrides>` on nproc ranks."""
    args = [
        "-m", "moe_train.train", "model=tiny", "trainer=ci", f"trainer.max_steps={STEPS}",
        "trainer.eval_batches=0", f"trainer.ckpt_every={STEPS}", f"trainer.run_dir={run_dir}",
        f"data.cache_dir={tmp_path.parent / 'corpus'}", "data.default_corpus_bytes=400000",
        *overrides,
    ]  # fmt: skip
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


class SingleProcessCurves:
    """1-process loss curves by overrides, each run once per test session."""

    def __init__(self, root: Path):
        self.root, self.curves = root, {}

    def __call__(self, overrides: list[str]) -> list[float]:
        key = tuple(sorted(overrides))
        if key not in self.curves:
            folder = self.root / f"single{len(self.curves)}"
            self.curves[key] = run(folder, folder / "run", 1, overrides)
        return self.curves[key]
