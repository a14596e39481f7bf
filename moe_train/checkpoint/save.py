"""Saving a checkpoint: sync or in the background, written into a temp folder, checksummed and
published atomically (a crash at any point leaves the previous checkpoint loadable); a failed
write, a full disk included, is an error that names the folder and what is kept."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from .. import fault_points
from ..parallel import CollectiveError, ParallelState
from ..parallel.objects import barrier, is_distributed
from .checksums import write_checksums
from .errors import CheckpointError, describe, short_cause
from .folder import FORMAT, LATEST_FILE, META_FILE, latest_checkpoint, prune
from .keys import shapes, state_views


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished save into place (one rename; tests patch this to simulate a crash)."""
    os.rename(tmp, final)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename into place: a full disk raises OSError(ENOSPC) naming nothing else."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    _write_bytes_atomic(path, text.encode())


def _write_meta(folder: Path, meta: dict) -> None:
    buf = io.BytesIO()  # serialised in memory, written by Python: write errors keep their errno
    torch.save(meta, buf)
    _write_bytes_atomic(folder / META_FILE, buf.getvalue())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict,
    state: ParallelState | None = None,
    keep: int = 2,
) -> Path:
    """Save model + optimizer (+ `extra`, picklable, from rank 0) as run_dir/step_{step:08d}.
    `model` is the bare model (a GradSync's `.module`, not its DDP wrapper): keys are its names.

    Every rank calls this. Returns the checkpoint directory. A failed write (a full disk, ...)
    raises CheckpointError naming the folder; the partial save is removed, `latest` untouched.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp_step_{step:08d}"
    with _save_errors(run_dir, tmp, step, main=state is None or state.dims.is_main):
        save = _Save(run_dir, step, model, optimizer, extra, state, keep)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(save.sd, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=not save.dist)
        fault_points.reached("save", step)  # tensors written, nothing published yet
        return save.finish()


class PendingCheckpoint:
    """A save whose tensors are being written in the background (`save_checkpoint_async`);
    `wait()` (every rank, collective) finishes it: meta, publish, `latest`, prune."""

    def __init__(self, save: _Save, future: Any):
        self.save, self.future = save, future

    def wait(self) -> Path:
        save = self.save
        with _save_errors(save.run_dir, save.tmp, save.step, main=save.main):
            self.future.result()
            return save.finish()


def save_checkpoint_async(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict,
    state: ParallelState,
    keep: int = 2,
) -> PendingCheckpoint:
    """save_checkpoint written in the background, as torch.distributed.checkpoint.async_save does
    it: the state is staged to CPU memory (one compact copy per tensor: training goes on changing
    the live ones) and `dcp.save` runs in a thread over `state.groups.checkpoint` (a gloo group of
    its own, so its collectives never interleave with training's). async_save itself is not used:
    its staging deep-copies each DTensor with the whole storage under it, and fails on FSDP's
    sharded parameters. Call `.wait()` before the next save and before exiting."""
    run_dir = Path(run_dir)
    with _save_errors(run_dir, run_dir / f".tmp_step_{step:08d}", step, main=state.dims.is_main):
        save = _Save(run_dir, step, model, optimizer, extra, state, keep)
        staged = {key: _staged(t) for key, t in save.sd.items()}
    writer = dcp.FileSystemWriter(str(save.tmp))
    group = state.groups.checkpoint

    def write() -> Any:
        fault_points.reached("async_save", step)  # in the writer thread, training goes on
        return dcp.save(staged, storage_writer=writer, process_group=group)

    return PendingCheckpoint(save, _writer_thread().submit(write))


def _staged(t: Tensor) -> Tensor:
    """A compact CPU copy of `t` (a DTensor keeps its mesh, placements and global shape)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach().to("cpu", copy=True)

    local = t.to_local().detach().to("cpu", copy=True)
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


_WRITER: ThreadPoolExecutor | None = None


def _writer_thread() -> ThreadPoolExecutor:
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe_train_ckpt")
    return _WRITER


class _Save:
    """One save: the temp folder made (collective), the state dict of views, then `finish`."""

    def __init__(self, run_dir, step, model, optimizer, extra, state, keep) -> None:
        self.run_dir, self.step, self.extra, self.state, self.keep = (
            Path(run_dir),
            step,
            extra,
            state,
            keep,
        )
        self.model = model  # the bare model: keys are its parameter names
        self.main = state is None or state.dims.is_main
        self.dist = is_distributed(state)
        self.final = self.run_dir / f"step_{step:08d}"
        self.tmp = self.run_dir / f".tmp_step_{step:08d}"
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        barrier(state)
        self.sd, self.optim_meta = state_views(self.model, optimizer)

    def finish(self) -> Path:
        """meta.pt, then checksums, publish atomically and prune (after every rank's tensors are
        written; collective)."""
        state = self.state
        if self.main:
            meta = {
                "format": FORMAT,
                "step": self.step,
                "extra": self.extra,
                "params": shapes(self.model),
                "optim": self.optim_meta,
                "world_size": state.dims.world_size if state else 1,
                "ep": state.dims.ep if state else 1,
            }
            _write_meta(self.tmp, meta)
        barrier(state)
        _finish_save(self.run_dir, self.tmp, self.final, self.keep, state)
        barrier(state)
        return self.final


def _finish_save(
    run_dir: Path, tmp: Path, final: Path, keep: int, state: ParallelState | None
) -> None:
    """Once every rank's files in `tmp` are complete: checksums (collective), then on rank 0
    publish `tmp` as `final`, point `latest` at it and prune."""
    write_checksums(tmp, state)
    if state is not None and not state.dims.is_main:
        return
    old = None
    if final.exists():  # re-saving a step (e.g. after a resume): move the old copy aside
        old = run_dir / f".old_{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    _publish(tmp, final)
    _write_text_atomic(run_dir / LATEST_FILE, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(run_dir, keep, final)


@contextlib.contextmanager
def _save_errors(run_dir: Path, tmp: Path, step: int, main: bool) -> Iterator[None]:
    """Turn write failures (OSError, torch's CheckpointException) into a CheckpointError that says
    what happened and where; a full disk is named as such. Collective failures pass through."""
    try:
        yield
    except CollectiveError:
        raise
    except (OSError, RuntimeError, CheckpointException) as e:
        full = _disk_full(e)
        if not full and not isinstance(e, (OSError, CheckpointException)):
            raise
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        previous = latest_checkpoint(run_dir)
        kept = f"{previous} is intact" if previous else "there is no earlier checkpoint"
        if full:
            raise CheckpointError(
                f"saving checkpoint step {step} failed: the disk is full (no space left writing "
                f"{tmp}; {_free_space(run_dir)} free on the filesystem of {run_dir}). The partial "
                f"save was removed and {kept}. Free space, lower trainer.keep_checkpoints or move "
                "trainer.run_dir to a larger disk, then run again to resume"
            ) from short_cause(e)
        raise CheckpointError(
            f"saving checkpoint step {step} into {tmp} failed: {describe(e)}. The partial save "
            f"was removed and {kept}"
        ) from short_cause(e)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """e, its causes and contexts, and the per-rank failures inside a CheckpointException."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]  # type: ignore[list-item]
        if isinstance(x, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]


def _disk_full(e: BaseException) -> bool:
    for x in _causes(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(x) or "unexpected pos" in str(x):  # torch's C++ writers
            return True
    return False


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB"
