"""Weights & Biases logging (`trainer.wandb=true`): the same records as metrics.jsonl.

The run's files go to run_dir/wandb/. Offline (no network, e.g. `WANDB_MODE=offline`; sync later
with `wandb sync run_dir/wandb/offline-run-*`) works like online. The W&B run id is kept in
run_dir/wandb_run_id, so a resumed moe-train run continues the same W&B run.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb_run_id"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            "trainer.wandb=true needs the wandb package: pip install wandb (or pip install -e "
            "'.[wandb]'); with WANDB_MODE=offline it logs without a network. Or set "
            "trainer.wandb=false (metrics.jsonl and TensorBoard log without it)"
        ) from e
    return wandb


class WandbSink:
    """A MetricsWriter sink: log(step, record) -> wandb.log of the numeric fields at `step`."""

    def __init__(self, run_dir: str | Path, project: str, name: str | None, config: dict):
        wandb = _import_wandb()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        self.run = wandb.init(
            project=project,
            name=name or run_dir.resolve().name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, record: dict[str, Any]) -> None:
        values = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and math.isfinite(v)
        }
        if values:
            self.run.log(values, step=step, commit=True)

    def close(self) -> None:
        self.run.finish()
