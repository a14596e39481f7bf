"""metrics.jsonl: one JSON record per logged step, mirrored to the sinks (TensorBoard, W&B)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .tensorboard_sink import TensorBoardSink


class MetricsWriter:
    """Appends one JSON line per logged step to run_dir/metrics.jsonl; mirrors to TensorBoard (when
    installed and `tensorboard`) and to `sinks` (objects with log(step, record) and close(), e.g.
    moe_train.metrics.wandb_sink.WandbSink). Only the writer of rank 0 is `enabled`."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        tensorboard: bool = True,
        sinks: list[Any] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks = list(sinks or []) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tb = TensorBoardSink.open(run_dir) if tensorboard else None
        if tb is not None:  # None: tensorboard is not installed (quietly off)
            self.sinks.insert(0, tb)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(step, record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
