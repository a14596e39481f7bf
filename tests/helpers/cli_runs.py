"""Run `moe-train` on the tiny model for parity tests (1 process or N gloo ranks under torchrun),
and cache 1-process loss curves so that several tests compare against one reference run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from moe_train.metrics import read_metrics

STEPS = 20
HALF = STEPS // 2


def run(
    tmp_path: Path, run_dir: Path, nproc: int, overrides: list[str], ckpt_every: int = STEPS
) -> list[float]:
    """Per-step training losses of `moe-train model=tiny trainer=ci <overrides>` on nproc ranks
    (a resumed run logs only the steps after its checkpoint)."""
    args = [
        "-m", "moe_train.train", "model=tiny", "trainer=ci", f"trainer.max_steps={STEPS}",
        "trainer.eval_batches=0", f"trainer.ckpt_every={ckpt_every}", f"trainer.run_dir={run_dir}",
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


# every current-generation routing option at once: sigmoid scores, raw weights x 2.5, the
# aux-loss-free bias, group-limited routing (2 groups = one per rank at ep=2), a gated shared expert
MODERN_ROUTING = [
    "router.score=sigmoid",
    "router.normalize_topk=false",
    "router.route_scale=2.5",
    "router.bias_update_rate=0.01",
    "router.num_groups=2",
    "router.topk_groups=1",
    "model.shared_experts=1",
    "model.shared_gate=true",
]


def bias_curve(run_dir: Path) -> list[tuple[float, ...]]:
    """Per step, every MoE layer's balancing-bias min and max (empty tuples without a bias)."""
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    return [tuple(v for k, v in sorted(r.items()) if k.endswith(("/bias_min", "/bias_max")))
            for r in records]  # fmt: skip


def resume_from(checkpoint: Path, run_dir: Path) -> Path:
    """A new run folder whose latest checkpoint is a copy of `checkpoint` (to resume elsewhere)."""
    run_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, run_dir / checkpoint.name)
    (run_dir / "latest").write_text(checkpoint.name + "\n")
    return run_dir


class SingleProcessCurves:
    """1-process loss curves by overrides, each run once per test session (checkpointed at
    HALF and at the end: `run_dir(overrides)` holds them)."""

    def __init__(self, root: Path):
        self.root, self.curves, self.dirs = root, {}, {}

    def __call__(self, overrides: list[str]) -> list[float]:
        key = tuple(sorted(overrides))
        if key not in self.curves:
            folder = self.root / f"single{len(self.curves)}"
            self.dirs[key] = folder / "run"
            self.curves[key] = run(folder, folder / "run", 1, overrides, ckpt_every=HALF)
        return self.curves[key]

    def run_dir(self, overrides: list[str]) -> Path:
        self(overrides)
        return self.dirs[tuple(sorted(overrides))]
