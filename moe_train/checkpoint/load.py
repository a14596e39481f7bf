"""Loading a checkpoint: verify every file first, check that it fits the model, then read into the
live tensors in place (any layout); `load_latest_checkpoint` falls back to the newest checkpoint
that verifies, moving damaged ones aside."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from ..parallel import ParallelState
from ..parallel.objects import barrier, from_main, is_distributed
from .checksums import verify_checksums
from .errors import CheckpointError, CorruptCheckpointError, describe, one_line, short_cause
from .folder import FORMATS, META_FILE, checkpoint_candidates, is_complete, quarantine
from .keys import optim_slots, param_table, shapes, state_views


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
    main = state is None or state.dims.is_main
    for path in from_main(state, lambda: checkpoint_candidates(run_dir)):
        try:
            return path, load_checkpoint(path, model, optimizer, state)
        except CorruptCheckpointError as e:
            if main:
                aside = quarantine(path)
                warnings.warn(
                    f"{e}. It was moved to {aside}; trying the checkpoint before it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            barrier(state)
    return None


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not is_complete(path):
        raise CorruptCheckpointError(
            f"checkpoint {path} is incomplete (missing {META_FILE} or .metadata): a save was "
            "interrupted; load an earlier checkpoint (latest_checkpoint skips incomplete ones)"
        )
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means corrupt
        raise CorruptCheckpointError(
            f"checkpoint {path}: cannot read {path / META_FILE}: {one_line(e)}"
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
        return [f"{path / '.metadata'} is unreadable ({one_line(e)})"]
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
    now = shapes(model)
    missing, unexpected = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (different model.n_layers / moe_every / router?)"
        )
    counts, sizes = [], []  # the first mismatch of each kind, in the model's order
    for fqn, want in now.items():
        got = saved[fqn]
        if want.get("expert") and got.get("num_experts") != want["num_experts"]:
            counts.append(
                f"checkpoint {path}: {fqn} has {got.get('num_experts')} experts, the model has "
                f"{want['num_experts']} (model.num_experts must match; parallel.ep may differ)"
            )
        if want["shape"] != got["shape"] or want["expert"] != got["expert"]:
            sizes.append(
                f"checkpoint {path}: {fqn} has shape {got['shape']}, the model expects "
                f"{want['shape']} (model config differs from the checkpoint's)"
            )
    # An expert count wins over a shape: a different model.num_experts changes the router's gate
    # shape too, and the count is the message that says what to fix.
    if counts or sizes:
        raise CheckpointError((counts or sizes)[0])


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: ParallelState | None = None,
    *,
    verify: bool = True,
) -> dict:
    """Load into `model` (the bare model: a GradSync's `.module`) and `optimizer` in place, at any
    parallel.ep, FSDP or not; returns the saved extra. DCP reads straight into the live tensors (DTensor shards, per-expert views): no
    second copy of the model or its optimizer state is allocated.

    Every rank calls this. Raises CheckpointError naming the path when the checkpoint is missing
    or does not fit the model (shapes, expert count), CorruptCheckpointError naming the file when
    it is incomplete or damaged (checked first: verify_checkpoint; verify=False skips the
    checksums), so a damaged file is found before anything is read into the live tensors.
    """
    path = Path(path)
    meta = verify_checkpoint(path, state) if verify else _read_meta(path)
    _check_fit(path, meta["params"], model)
    params, info = param_table(model)
    if optimizer is not None:
        _check_optimizer(path, optimizer, meta["optim"], params)
        if any(meta["optim"]["state"].values()):
            init_optimizer_state(optimizer)
    sd, _ = state_views(model, optimizer)
    saved_keys = _saved_optim_keys(meta["optim"]["state"])
    sd = {k: v for k, v in sd.items() if not k.startswith("optim/") or _optim_key(k) in saved_keys}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                sd,
                storage_reader=dcp.FileSystemReader(str(path)),
                no_dist=not is_distributed(state),
            )
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CorruptCheckpointError(
            f"checkpoint {path}: reading the tensors failed: {describe(e)}"
        ) from short_cause(e)
    if optimizer is not None:
        _load_optimizer_values(optimizer, meta["optim"], params)
    barrier(state)
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
    slots = optim_slots(optimizer, params)
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
