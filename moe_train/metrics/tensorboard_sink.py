"""TensorBoard events (run_dir/tb) of the same records as metrics.jsonl, when tensorboard is
installed (`trainer.tensorboard`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class TensorBoardSink:
    """A MetricsWriter sink: every finite number of a record as a scalar at its step."""

    def __init__(self, writer: Any):
        self.writer = writer  # a torch.utils.tensorboard.SummaryWriter

    @classmethod
    def open(cls, run_dir: str | Path) -> TensorBoardSink | None:
        """A sink writing into run_dir/tb; None when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return cls(SummaryWriter(log_dir=str(Path(run_dir) / "tb")))

    def log(self, step: int, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()
