"""Run metrics: metrics.jsonl, TensorBoard (when installed), Weights & Biases (when asked), the
progress bar, GPU stats, and the TrainLogger that gathers them on the log cadence. Rank 0 writes."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .gpu_stats import gather_gpu_stats, gpu_stats

if TYPE_CHECKING:
    from .engines import Engine
    from .training.cadence import Every
    from .training.step import StepOutput
    from .training.train_state import TrainState


def moe_layer_metrics(layers) -> dict[str, float]:
    """Per-MoE-layer load balance, drops and all-to-all bytes of the last forward."""
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        for key in ("load_cv", "load_min", "load_max", "dropped_frac", "send_bytes", "recv_bytes"):
            if key in layer.last_stats:
                out[f"moe{i}/{key}"] = layer.last_stats[key]
    return out


class MetricsWriter:
    """Appends one JSON line per logged step to run_dir/metrics.jsonl; mirrors to TensorBoard and
    to `sinks` (objects with log(step, record) and close(), e.g. moe_train.wandb_sink.WandbSink)."""

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
        for sink in self.sinks:
            sink.log(step, record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


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


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, line: str) -> None: ...
    def close(self) -> None: ...


def progress_bar(start: int, total: int, enabled: bool) -> Any:
    """A tqdm bar over the steps (or one that shows nothing)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


class TrainLogger:
    """The log cadence. Every log_every steps and at the last: loss and aux losses (mean over
    ranks), lr, grad_norm, step_ms and tokens_per_s over the steps since the last log, mfu (model
    FLOPs utilisation, when `flops_per_token` and the GPUs' summed `peak_flops` are known),
    mem/state_bytes (the largest rank's parameter + gradient + optimizer state bytes, measured
    from its tensors), skipped_steps, per-MoE-layer stats and, on GPUs, every rank's GPU stats
    (gpu{r}/...) to metrics.jsonl/TensorBoard/sinks and the progress bar. Collective on log steps:
    every rank calls after_step. On rank 0 (`is_main`) a resumed run's metrics.jsonl is cut back
    to the resume step first. `report_val` shows a validation loss (bar and a line)."""

    def __init__(
        self,
        run_dir: str | Path,
        cadence: Every,
        *,
        start: int,
        tokens_per_step: int,
        mean_over_ranks: Callable[[Tensor], Tensor],
        device: torch.device,
        is_main: bool,
        tensorboard: bool,
        progress: bool,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        sinks: list[Any] | None = None,
        max_over_ranks: Callable[[Tensor], Tensor] | None = None,
    ):
        if is_main:
            truncate_metrics(run_dir, start)
        self.writer = MetricsWriter(run_dir, enabled=is_main, tensorboard=tensorboard, sinks=sinks)
        self.bar = progress_bar(start, cadence.last, enabled=is_main and progress)
        self.cadence, self.tokens_per_step = cadence, tokens_per_step
        self.mean_over_ranks, self.device = mean_over_ranks, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.is_main, self.progress = is_main, progress
        self.started = time.perf_counter()
        self._since = self.started  # start of the current log window
        self.max_over_ranks = max_over_ranks or (lambda t: t)
        self._steps_in_window = 0
        self._postfix: dict[str, str] = {}

    def after_step(self, train_state: TrainState, out: StepOutput, engine: Engine) -> None:
        self._steps_in_window += 1
        if self.cadence.due(train_state.step):
            record = self.record(train_state, out, engine)
            train_state.last_loss = record["loss"]
            self.writer.log(train_state.step, record)
            self._show(
                loss=f"{record['loss']:.4f}",
                ms=f"{record['step_ms']:.0f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
            )
            self._since, self._steps_in_window = time.perf_counter(), 0
        self.bar.update(1)

    def _show(self, **fields: str) -> None:
        self._postfix.update(fields)
        self.bar.set_postfix(**self._postfix)

    def report_val(self, train_state: TrainState, val_loss: float) -> None:
        """A validation loss: into the bar's fields and as a line (rank 0)."""
        if not self.is_main:
            return
        line = f"step {train_state.step}: train loss {train_state.last_loss:.4f}, val loss {val_loss:.4f}"
        if self.progress:
            self._show(val=f"{val_loss:.4f}")
            self.bar.write(line)
        else:
            print(line)

    def elapsed(self) -> float:
        """Seconds since the logger was made (the start of the loop)."""
        return time.perf_counter() - self.started

    def record(self, train_state: TrainState, out: StepOutput, engine: Engine) -> dict[str, Any]:
        """The metrics of one log step (collective: means over ranks, GPU stats gather)."""
        elapsed = time.perf_counter() - self._since
        steps = max(1, self._steps_in_window)
        tokens_per_s = self.tokens_per_step * steps / elapsed
        record: dict[str, Any] = {
            "loss": float(self.mean_over_ranks(out.loss)),
            "lr": out.lr,
            "grad_norm": engine.grad_norm(),
            "step_ms": 1e3 * elapsed / steps,
            "tokens_per_s": tokens_per_s,
            "skipped_steps": train_state.skipped,
            **{
                f"aux/{name}": float(self.mean_over_ranks(torch.as_tensor(value)))
                for name, value in out.aux.items()
            },
            **moe_layer_metrics(engine.module.moe_layers()),
        }
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        state = engine.state_bytes()  # params + grads + optimizer state: the largest rank's
        if state is not None:
            record["mem/state_bytes"] = int(self.max_over_ranks(torch.tensor(state)))
        if self.device.type == "cuda":  # a collective: every rank reports, rank 0 logs
            per_rank = gather_gpu_stats(gpu_stats(self.device.index))
            for r, stats in enumerate(per_rank or []):
                record.update({f"gpu{r}/{k}": v for k, v in stats.items()})
        return record

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
