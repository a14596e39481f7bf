"""Run metrics: console lines, metrics.jsonl, TensorBoard (when installed). Rank 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def moe_layer_metrics(layers) -> dict[str, float]:
    """Per-MoE-layer load balance, drops and all-to-all bytes of the last forward."""
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        for key in ("load_cv", "load_min", "load_max", "dropped_frac", "send_bytes", "recv_bytes"):
            if key in layer.last_stats:
                out[f"moe{i}/{key}"] = layer.last_stats[key]
    return out


class MetricsWriter:
    """Appends one JSON line per logged step to run_dir/metrics.jsonl; mirrors to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard not installed: quietly off
                self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl (for tests and tools)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
