"""Atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `run_dir`:
    step_00000100/      one checkpoint: DCP shards (`*.distcp`, `.metadata`), `meta.pt` (rank 0)
                        and `checksums.json` (size and CRC-32 of every file, moe_train.checksums)
    latest              text file naming the newest complete checkpoint directory (a bare
                        `step_*` name: anything else, e.g. `../other/step_*`, is refused)
    .tmp_step_*/        a save in progress (or one that crashed; ignored and cleaned up later)
    .old_step_*/        the previous copy of a step being re-saved (restored or removed later)
    .corrupt_step_*/    a checkpoint that failed verification on load, kept for inspection

Keys: dense parameters/buffers as `model/<fqn>`; expert parameters (`is_expert_param`, stacked
[E_local, ...], this rank's share given by the layer's ExpertShard) as one key per GLOBAL expert,
`model/<fqn>/expert_<id>`, and so is their stacked optimizer state
(`optim/<fqn>/<name>/expert_<id>`). The values are the live tensors or views of them (FSDP
DTensor shards, per-expert DTensor views): nothing is cloned to save, nothing allocated twice to
load. Each rank writes only what it holds and DCP de-duplicates replicated keys, so a checkpoint
taken in any layout (ep, dp, parallel.fsdp on or off) loads in any other.
A save is written into a temp dir, checksummed, renamed into place, then `latest` is replaced
atomically: a crash at any point leaves the previous checkpoint loadable. A load verifies every
file first; `load_latest_checkpoint` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
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

from .checksums import verify_checksums, write_checksums
from .layer import MoELayer
from .parallel import CollectiveError, ParallelState, is_expert_param, unwrap_model
from .parallel.objects import from_main

FORMAT = 2  # 2: checksums.json in every checkpoint; 1 (no checksums) still loads
FORMATS = (1, 2)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
META_FILE = "meta.pt"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged (checksum, size, missing file, unreadable): an earlier
    checkpoint may still load. A checkpoint that does not fit the model is not corrupt."""


# ---- the model's parameters, with experts along the global axis --------------------------------
def _expert_info(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """fqn of every expert parameter -> (first global expert, local experts, global experts)."""
    info: dict[str, tuple[int, int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoELayer):
            shard, E = mod.shard, mod.num_experts
            where = (shard.first_expert(E), shard.num_local(E), E)
            prefix = f"{name}.experts." if name else "experts."
            for pname, p in mod.experts.named_parameters(recurse=False):
                if is_expert_param(p):
                    info[prefix + pname] = where
    return info


def _param_table(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, tuple[int, int, int]]]:
    params = dict(model.named_parameters(remove_duplicate=True))
    info = _expert_info(model)
    for fqn, p in params.items():
        if is_expert_param(p) and fqn not in info:
            raise CheckpointError(f"expert parameter {fqn} is not inside a MoELayer")
    return params, info


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k not in params}


def _expert_keys(prefix: str, first: int, num_local: int) -> list[tuple[int, str]]:
    return [(i, f"{prefix}/expert_{first + i:05d}") for i in range(num_local)]


def _shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    params, info = _param_table(model)
    out: dict[str, dict[str, Any]] = {}
    for fqn, p in params.items():
        if fqn in info:
            out[fqn] = {"expert": True, "num_experts": info[fqn][2], "shape": list(p.shape[1:])}
        else:
            out[fqn] = {"expert": False, "shape": list(p.shape)}
    for name, b in _buffers(model).items():
        out[name] = {"expert": False, "shape": list(b.shape), "buffer": True}
    return out


def _optim_slots(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]):
    """(fqn, param, group index) for every parameter the optimizer holds, in its order."""
    names = {id(p): n for n, p in params.items()}
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter the model does not name")
            out.append((names[id(p)], p, gi))
    return out


def _expert_slice(t: Tensor, i: int) -> Tensor:
    """Local expert i of a stacked tensor [E_local, ...] as a view: a plain slice, or for a
    DTensor (FSDP shards experts along dim 1) a DTensor over the same mesh whose shard dims are
    one lower, so the slice of every global expert is itself a sharded tensor that DCP reshards."""
    if not hasattr(t, "to_local"):
        return t.detach()[i]
    from torch.distributed.tensor import DTensor, Shard

    placements = []
    for pl in t.placements:
        if pl.is_shard() and pl.dim == 0:
            raise CheckpointError("an expert tensor sharded along its expert dim (0)")
        placements.append(Shard(pl.dim - 1) if pl.is_shard() else pl)
    shape = t.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    local = t.to_local().detach()[i]
    return DTensor.from_local(
        local, t.device_mesh, placements, run_check=False, shape=shape, stride=stride
    )


def _is_per_expert(v: Tensor, p: Tensor) -> bool:
    """An expert parameter's optimizer state that is stacked like it ([E_local, ...]: Adam's
    moments, Adafactor's row/column statistics), as opposed to a scalar (the step)."""
    return v.dim() == p.dim() and v.shape[0] == p.shape[0]


def _model_tensors(
    model: nn.Module, params: dict[str, Tensor], info: dict[str, tuple[int, int, int]]
) -> dict[str, Tensor]:
    """Checkpoint key -> live tensor (or a view of it) for every parameter and buffer; stacked
    expert weights as one view per GLOBAL expert id. Nothing is copied."""
    out: dict[str, Tensor] = {}
    for fqn, p in params.items():
        if fqn in info:
            first, n, _ = info[fqn]
            out.update(
                {key: _expert_slice(p, i) for i, key in _expert_keys(f"model/{fqn}", first, n)}
            )
        else:
            out[f"model/{fqn}"] = p.detach()
    out.update({f"model/{name}": b.detach() for name, b in _buffers(model).items()})
    return out


def _optim_tensors(
    optimizer: torch.optim.Optimizer,
    params: dict[str, Tensor],
    info: dict[str, tuple[int, int, int]],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(checkpoint key -> live optimizer state tensor or view, the optimizer's meta: parameter
    groups' hyperparameters and every state entry's kind). Expert state per global expert."""
    sd: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"param_groups": [], "state": {}}
    slots = _optim_slots(optimizer, params)
    for gi, group in enumerate(optimizer.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper["params"] = [f for f, _, g in slots if g == gi]
        meta["param_groups"].append(hyper)
    for fqn, p, _ in slots:
        entries: dict[str, Any] = {}
        for name, v in optimizer.state.get(p, {}).items():
            if isinstance(v, Tensor) and fqn in info and _is_per_expert(v, p):
                first, n, _ = info[fqn]
                for i, key in _expert_keys(f"optim/{fqn}/{name}", first, n):
                    sd[key] = _expert_slice(v, i)
                entries[name] = {"kind": "expert", "dtype": str(v.dtype)}
            elif isinstance(v, Tensor):
                sd[f"optim/{fqn}/{name}"] = v.detach()
                entries[name] = {"kind": "tensor", "shape": list(v.shape), "dtype": str(v.dtype)}
            else:
                entries[name] = {"kind": "value", "value": v}
        meta["state"][fqn] = entries
    return sd, meta


# ---- save ---------------------------------------------------------------------------------------
def _save_state(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """(DCP state dict of views of the live tensors, the optimizer's meta): no clone. DCP copies
    one tensor at a time to the CPU while writing (views of a larger storage included)."""
    params, info = _param_table(model)
    sd = _model_tensors(model, params, info)
    optim_meta: dict[str, Any] = {"param_groups": [], "state": {}}
    if optimizer is not None:
        optim_sd, optim_meta = _optim_tensors(optimizer, params, info)
        sd.update(optim_sd)
    return sd, optim_meta


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


def _dist(state: ParallelState | None) -> bool:
    return state is not None and state.distributed


def _barrier(state: ParallelState | None) -> None:
    if state is not None and state.distributed:
        state.barrier()


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

    Every rank calls this. Returns the checkpoint directory. A failed write (a full disk, ...)
    raises CheckpointError naming the folder; the partial save is removed, `latest` untouched.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp_step_{step:08d}"
    with _save_errors(run_dir, tmp, step, main=state is None or state.is_main):
        save = _Save(run_dir, step, model, optimizer, extra, state, keep)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(save.sd, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=not save.dist)
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
    with _save_errors(run_dir, run_dir / f".tmp_step_{step:08d}", step, main=state.is_main):
        save = _Save(run_dir, step, model, optimizer, extra, state, keep)
        staged = {key: _staged(t) for key, t in save.sd.items()}
    writer = dcp.FileSystemWriter(str(save.tmp))
    group = state.groups.checkpoint
    future = _writer_thread().submit(dcp.save, staged, storage_writer=writer, process_group=group)
    return PendingCheckpoint(save, future)


def _staged(t: Tensor) -> Tensor:
    """A compact CPU copy of `t` (a DTensor keeps its mesh, placements and global shape)."""
    if not hasattr(t, "to_local"):
        return t.detach().to("cpu", copy=True)
    from torch.distributed.tensor import DTensor

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
        self.model = unwrap_model(model)  # keys are the bare model's names
        self.main = state is None or state.is_main
        self.dist = _dist(state)
        self.final = self.run_dir / f"step_{step:08d}"
        self.tmp = self.run_dir / f".tmp_step_{step:08d}"
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        _barrier(state)
        self.sd, self.optim_meta = _save_state(self.model, optimizer)

    def finish(self) -> Path:
        """meta.pt, then checksums, publish atomically and prune (after every rank's tensors are
        written; collective)."""
        state = self.state
        if self.main:
            meta = {
                "format": FORMAT,
                "step": self.step,
                "extra": self.extra,
                "params": _shapes(self.model),
                "optim": self.optim_meta,
                "world_size": state.world_size if state else 1,
                "ep": state.ep if state else 1,
            }
            _write_meta(self.tmp, meta)
        _barrier(state)
        _finish_save(self.run_dir, self.tmp, self.final, self.keep, state)
        _barrier(state)
        return self.final


def _finish_save(
    run_dir: Path, tmp: Path, final: Path, keep: int, state: ParallelState | None
) -> None:
    """Once every rank's files in `tmp` are complete: checksums (collective), then on rank 0
    publish `tmp` as `final`, point `latest` at it and prune."""
    write_checksums(tmp, state)
    if state is not None and not state.is_main:
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
    _prune(run_dir, keep, final)


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
            ) from _short_cause(e)
        raise CheckpointError(
            f"saving checkpoint step {step} into {tmp} failed: {_describe(e)}. The partial save "
            f"was removed and {kept}"
        ) from _short_cause(e)


def _short_cause(e: BaseException) -> BaseException | None:
    """The cause to chain: not torch's CheckpointException, whose text is every rank's traceback
    (its per-rank summary is in our message)."""
    return None if isinstance(e, CheckpointException) else e


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


def _describe(e: BaseException) -> str:
    """One line per underlying failure (torch's CheckpointException holds one per rank)."""
    if isinstance(e, CheckpointException):
        parts = []
        for rank, failure in sorted(e.failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {_one_line(exc)}")
        return "; ".join(parts) or "CheckpointException"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    hint = " (a file ends early: truncated?)" if isinstance(e, EOFError) else ""
    return f"{type(e).__name__}: {text[0][:300] if text else ''}{hint}"


# ---- the checkpoints of a run folder ------------------------------------------------------------
def _complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / ".metadata").is_file()


def _steps(run_dir: Path, prefix: str = "") -> list[tuple[int, Path]]:
    out = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = _STEP_RE.match(p.name.removeprefix(prefix)) if p.name.startswith(prefix) else None
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _prune(run_dir: Path, keep: int, current: Path) -> None:
    """Keep the newest `keep` complete checkpoints (always `current`, the one just published);
    remove crashed saves; restore or remove what a killed re-save left (`.old_step_*`)."""
    for step, old in _steps(run_dir, ".old_"):
        twin = run_dir / f"step_{step:08d}"
        if _complete(twin):
            shutil.rmtree(old, ignore_errors=True)
        elif _complete(old):  # killed between moving the old copy aside and publishing
            shutil.rmtree(twin, ignore_errors=True)
            os.rename(old, twin)
    done = [p for _, p in _steps(run_dir) if _complete(p)]
    for p in done[: max(0, len(done) - max(1, keep))]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".tmp_step_*"):  # saves that crashed
        shutil.rmtree(p, ignore_errors=True)


def _pointer(run_dir: Path) -> Path | None:
    """The folder `latest` names when it is a step_* folder of run_dir (else None, with a
    warning: the pointer may not lead outside the run folder)."""
    pointer = run_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_RE.match(name):
        warnings.warn(
            f"{pointer} names {name!r}, not a step_* folder inside {run_dir}: ignored (a run "
            "resumes only from its own checkpoints); using the newest complete checkpoint",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return run_dir / name


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints a resume may load, in the order to try them: the one `latest`
    names, then the older complete ones, newest first. A step whose re-save was killed counts
    with its `.old_step_*` copy."""
    run_dir = Path(run_dir)
    found = {s: p for s, p in _steps(run_dir, ".old_") if _complete(p)}
    found.update({s: p for s, p in _steps(run_dir) if _complete(p)})
    order = [found[s] for s in sorted(found, reverse=True)]
    target = _pointer(run_dir)
    if target is not None and target in order:
        return order[order.index(target) :]
    return order


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete step_* dir; None when there is none."""
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


def _quarantine(path: Path) -> Path:
    """Move a checkpoint that failed verification out of the way (rank 0), for inspection."""
    dest = path.with_name(f".corrupt_{path.name.removeprefix('.old_')}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f".corrupt_{path.name.removeprefix('.old_')}.{n}")
    os.rename(path, dest)
    return dest


def load_latest_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: ParallelState | None = None,
) -> tuple[Path, dict] | None:
    """Load the newest checkpoint of run_dir that verifies: (its path, its extra), or None when
    none does. A damaged one is reported (a RuntimeWarning naming the file), moved aside as
    `.corrupt_step_*` and the next older one tried. Every rank calls this and all load the same."""
    run_dir = Path(run_dir)
    main = state is None or state.is_main
    for path in from_main(state, lambda: checkpoint_candidates(run_dir)):
        try:
            return path, load_checkpoint(path, model, optimizer, state)
        except CorruptCheckpointError as e:
            if main:
                aside = _quarantine(path)
                warnings.warn(
                    f"{e}. It was moved to {aside}; trying the checkpoint before it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _barrier(state)
    return None


# ---- load ---------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not _complete(path):
        raise CorruptCheckpointError(
            f"checkpoint {path} is incomplete (missing {META_FILE} or .metadata): a save was "
            "interrupted; load an earlier checkpoint (latest_checkpoint skips incomplete ones)"
        )
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means corrupt
        raise CorruptCheckpointError(
            f"checkpoint {path}: cannot read {path / META_FILE}: {_one_line(e)}"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(
            f"checkpoint {path}: unknown format {meta.get('format') if isinstance(meta, dict) else '?'}"
            f" (this moe-train reads {', '.join(map(str, FORMATS))})"
        )
    return meta


def _storage_problems(path: Path) -> list[str]:
    """Files that DCP's .metadata names but that are missing or shorter than it says (the check of
    checkpoints saved before checksums.json existed)."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - empty, truncated or garbage .metadata
        return [f"{path / '.metadata'} is unreadable ({_one_line(e)})"]
    need: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size < size:
            problems.append(f"{f}: {f.stat().st_size} bytes, .metadata needs {size} (truncated)")
    return problems


def verify_checkpoint(path: str | Path, state: ParallelState | None = None) -> dict:
    """Check every file of a checkpoint before loading it: against checksums.json (format 2), or
    that every shard .metadata names is there and long enough (format 1). Returns its meta;
    raises CorruptCheckpointError naming the damaged files. Collective: every rank calls it."""
    path = Path(path)
    meta = _read_meta(path)
    if meta["format"] >= 2:
        problems = verify_checksums(path, state)
    else:
        problems = from_main(state, lambda: _storage_problems(path))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: {'; '.join(problems[:3])}{more}"
        )
    return meta


def _check_fit(path: Path, saved: dict[str, dict], model: nn.Module) -> None:
    now = _shapes(model)
    missing, unexpected = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (different model.n_layers / moe_every / router?)"
        )
    for fqn, want in now.items():
        got = saved[fqn]
        if want.get("expert") and got.get("num_experts") != want["num_experts"]:
            raise CheckpointError(
                f"checkpoint {path}: {fqn} has {got.get('num_experts')} experts, the model has "
                f"{want['num_experts']} (model.num_experts must match; parallel.ep may differ)"
            )
    for fqn, want in now.items():
        got = saved[fqn]
        if want["shape"] != got["shape"] or want["expert"] != got["expert"]:
            raise CheckpointError(
                f"checkpoint {path}: {fqn} has shape {got['shape']}, the model expects "
                f"{want['shape']} (model config differs from the checkpoint's)"
            )


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: ParallelState | None = None,
    *,
    verify: bool = True,
) -> dict:
    """Load into `model` (and `optimizer`) in place, at any parallel.ep, FSDP or not; returns the
    saved extra. DCP reads straight into the live tensors (DTensor shards, per-expert views): no
    second copy of the model or its optimizer state is allocated.

    Every rank calls this. Raises CheckpointError naming the path when the checkpoint is missing
    or does not fit the model (shapes, expert count), CorruptCheckpointError naming the file when
    it is incomplete or damaged (checked first: verify_checkpoint; verify=False skips the
    checksums), so a damaged file is found before anything is read into the live tensors.
    """
    model = unwrap_model(model)  # keys are the bare model's names
    path = Path(path)
    meta = verify_checkpoint(path, state) if verify else _read_meta(path)
    _check_fit(path, meta["params"], model)
    params, info = _param_table(model)
    if optimizer is not None:
        _check_optimizer(path, optimizer, meta["optim"], params)
        if any(meta["optim"]["state"].values()):
            init_optimizer_state(optimizer)
    sd, _ = _save_state(model, optimizer)
    saved_keys = _saved_optim_keys(meta["optim"]["state"])
    sd = {k: v for k, v in sd.items() if not k.startswith("optim/") or _optim_key(k) in saved_keys}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not _dist(state))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CorruptCheckpointError(
            f"checkpoint {path}: reading the tensors failed: {_describe(e)}"
        ) from _short_cause(e)
    if optimizer is not None:
        _load_optimizer_values(optimizer, meta["optim"], params)
    _barrier(state)
    return meta["extra"]


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors where they will live (a step at learning rate 0 on zero
    gradients: the parameters do not move), so that a load can fill them in place."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _check_optimizer(path: Path, optimizer: torch.optim.Optimizer, saved: dict, params) -> None:
    slots = _optim_slots(optimizer, params)
    current = [[f for f, _, g in slots if g == gi] for gi in range(len(optimizer.param_groups))]
    if [g["params"] for g in saved["param_groups"]] != current:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer's parameter groups differ from the saved ones"
        )


def _saved_optim_keys(saved_state: dict[str, dict]) -> set[tuple[str, str]]:
    return {(fqn, name) for fqn, entries in saved_state.items() for name in entries}


def _optim_key(key: str) -> tuple[str, str]:
    """'optim/<fqn>/<name>[/expert_<id>]' -> (fqn, name)."""
    parts = key.split("/")
    return parts[1], parts[2]


def _load_optimizer_values(optimizer: torch.optim.Optimizer, saved: dict, params) -> None:
    """The saved hyperparameters and non-tensor state values (the tensors were loaded in place);
    a parameter without saved state (never stepped) gets none."""
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for fqn, p in params.items():
        entries = saved["state"].get(fqn, {})
        if not entries:
            optimizer.state.pop(p, None)
            continue
        for name, entry in entries.items():
            if entry["kind"] == "value":
                optimizer.state[p][name] = entry["value"]


__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "PendingCheckpoint",
    "checkpoint_candidates",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
    "save_checkpoint_async",
    "verify_checkpoint",
]
