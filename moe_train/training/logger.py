"""The log cadence (TrainLogger), the progress bar on a terminal and one plain line per log step
elsewhere (a Slurm .out file, nohup, a pipe): what the user sees while training."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from ..hardware import device_peak_flops
from ..metrics import (
    MetricsWriter,
    gather_gpu_stats,
    gpu_stats,
    moe_layer_metrics,
    truncate_metrics,
)
from ..metrics.wandb_sink import WandbSink
from ..plan.costs import model_flops_per_token
from .cadence import Every

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..engines import Engine
    from ..parallel import ParallelState
    from .step import StepOutput
    from .train_state import TrainState


def _sinks(cfg: TrainConfig) -> list[Any]:
    """Rank 0's extra metric sinks: Weights & Biases when trainer.wandb."""
    if not cfg.trainer.wandb:
        return []
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    t = cfg.trainer
    return [WandbSink(t.run_dir, t.wandb_project, t.wandb_run_name, config)]  # type: ignore[arg-type]


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


# metrics.jsonl keys a log line shows, with their format (mfu only where the peak is known)
LINE_FIELDS = (
    ("loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".4g"), ("step_ms", ".1f"),
    ("tokens_per_s", ".0f"), ("mfu", ".4f"), ("dropped_frac", ".4f"),
)  # fmt: skip


def log_line(step: int, total: int, record: dict[str, Any]) -> str:
    """One log step as `step=S/N key=value ...`, the keys of metrics.jsonl (dropped_frac: the
    mean over the MoE layers of moe<i>/dropped_frac; skipped_steps only when some were)."""
    values = {**record, **_dropped(record)}
    parts = [f"step={step}/{total}"]
    parts += [f"{k}={values[k]:{fmt}}" for k, fmt in LINE_FIELDS if k in values]
    if record.get("skipped_steps"):
        parts.append(f"skipped_steps={record['skipped_steps']}")
    return " ".join(parts)


def val_line(step: int, total: int, val_loss: float) -> str:
    return f"step={step}/{total} val_loss={val_loss:.4f}"


def _dropped(record: dict[str, Any]) -> dict[str, float]:
    drops = [v for k, v in record.items() if k.startswith("moe") and k.endswith("/dropped_frac")]
    return {"dropped_frac": sum(drops) / len(drops)} if drops else {}


class TrainLogger:
    """The log cadence. Every trainer.log_every steps and at the last: loss and aux losses (mean
    over ranks), lr, grad_norm, step_ms and tokens_per_s over the steps since the last log, mfu
    (model FLOPs utilisation: tokens/s x the planner's model FLOPs per token / the GPUs' summed
    dense peak, moe_train.hardware; absent where the peak is unknown, e.g. on CPUs),
    mem/state_bytes (the largest rank's parameter + gradient + optimizer state bytes, measured
    from its tensors), skipped_steps, per-MoE-layer stats and, on GPUs, every rank's GPU stats
    (gpu{r}/...) to metrics.jsonl/TensorBoard/sinks and the progress bar. Collective on log steps:
    every rank calls after_step. On rank 0 (`is_main`) a resumed run's metrics.jsonl is cut back
    to the resume step first. `report_val` shows a validation loss (bar and a line).

    With trainer.progress, rank 0 shows a bar when stdout is a terminal, else one `log_line` per
    log step (a bar rewritten with carriage returns is unreadable in a file)."""

    def __init__(self, cfg: TrainConfig, parallel: ParallelState, start: int):
        trainer, run_dir = cfg.trainer, Path(cfg.trainer.run_dir)
        self.parallel, self.progress = parallel, trainer.progress
        self.is_main = parallel.dims.is_main
        self.cadence = Every(trainer.log_every, trainer.max_steps)
        self.tokens_per_step = trainer.global_batch_size * cfg.model.seq_len
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.router)
        peak = device_peak_flops(parallel.device)
        self.peak_flops = peak * parallel.dims.world_size if peak else None
        if self.is_main:
            truncate_metrics(run_dir, start)
        sinks = _sinks(cfg) if self.is_main else []
        self.writer = MetricsWriter(run_dir, self.is_main, trainer.tensorboard, sinks)
        live = self.is_main and self.progress
        self.lines = live and not _is_terminal(sys.stdout)
        self.bar = progress_bar(start, self.cadence.last, enabled=live and not self.lines)
        self.started = time.perf_counter()
        self._since = self.started  # start of the current log window
        self._steps_in_window = 0
        self._postfix: dict[str, str] = {}

    def after_step(self, train_state: TrainState, out: StepOutput, engine: Engine) -> None:
        self._steps_in_window += 1
        if self.cadence.due(train_state.step):
            record = self.record(train_state, out, engine)
            train_state.last_loss = record["loss"]
            self.writer.log(train_state.step, record)
            if self.lines:
                print(log_line(train_state.step, self.cadence.last, record), flush=True)
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
        line = val_line(train_state.step, self.cadence.last, val_loss)
        if self.progress and not self.lines:
            self._show(val=f"{val_loss:.4f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def elapsed(self) -> float:
        """Seconds since the logger was made (the start of the loop)."""
        return time.perf_counter() - self.started

    def record(self, train_state: TrainState, out: StepOutput, engine: Engine) -> dict[str, Any]:
        """The metrics of one log step (collective: means over ranks, GPU stats gather)."""
        elapsed = time.perf_counter() - self._since
        steps = max(1, self._steps_in_window)
        tokens_per_s = self.tokens_per_step * steps / elapsed
        record: dict[str, Any] = {
            "loss": float(self.parallel.all_reduce_mean(out.loss)),
            "lr": out.lr,
            "grad_norm": engine.grad_norm(),
            "step_ms": 1e3 * elapsed / steps,
            "tokens_per_s": tokens_per_s,
            "skipped_steps": train_state.skipped,
            **{
                f"aux/{name}": float(self.parallel.all_reduce_mean(torch.as_tensor(value)))
                for name, value in out.aux.items()
            },
            **moe_layer_metrics(engine.module.moe_layers()),
        }
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        state = engine.state_bytes()  # params + grads + optimizer state: the largest rank's
        if state is not None:
            record["mem/state_bytes"] = int(self.parallel.all_reduce_max(torch.tensor(state)))
        device = self.parallel.device
        if device.type == "cuda":  # a collective: every rank reports, rank 0 logs
            per_rank = gather_gpu_stats(gpu_stats(device.index))
            for r, stats in enumerate(per_rank or []):
                record.update({f"gpu{r}/{k}": v for k, v in stats.items()})
        return record

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
