"""Reading metrics.jsonl back: the records, cut back on resume, the last logged losses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl ([] when there is none). A torn last line (the
    process died while writing it) is dropped with a warning; a bad line before it raises
    ValueError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if any(rest.strip() for rest in lines[i:]):
                raise ValueError(f"{path}:{i}: not a metrics record ({e}): {line[:80]!r}") from None
            warnings.warn(
                f"{path}:{i}: dropping a torn last line (a run stopped while writing it): "
                f"{line[:80]!r}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        records.append(record)
    return records


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again), and a
    torn last line."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


def last_logged(run_dir: str | Path, step: int) -> dict[str, float]:
    """The last logged `loss` and `val_loss` at or before `step` (keys absent when never logged)."""
    out: dict[str, float] = {}
    for r in read_metrics(run_dir):
        if r["step"] <= step:
            out.update({k: r[k] for k in ("loss", "val_loss") if k in r})
    return out
