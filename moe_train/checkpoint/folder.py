"""The checkpoints of a run folder: which are complete, which `latest` names, pruning, quarantine.

step_00000100/      one checkpoint: DCP shards (`*.distcp`, `.metadata`), `meta.pt` (rank 0)
                    and `checksums.json` (size and CRC-32 of every file, checksums.py)
latest              text file naming the newest complete checkpoint directory (a bare
                    `step_*` name: anything else, e.g. `../other/step_*`, is refused)
.tmp_step_*/        a save in progress (or one that crashed; ignored and cleaned up later)
.old_step_*/        the previous copy of a step being re-saved (restored or removed later)
.corrupt_step_*/    a checkpoint that failed verification on load, kept for inspection
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

FORMAT = 2  # of meta.pt: 2: checksums.json in every checkpoint; 1 (no checksums) still loads
FORMATS = (1, 2)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
META_FILE = "meta.pt"
LATEST_FILE = "latest"


def is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / ".metadata").is_file()


def _steps(run_dir: Path, prefix: str = "") -> list[tuple[int, Path]]:
    out = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = _STEP_RE.match(p.name.removeprefix(prefix)) if p.name.startswith(prefix) else None
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(run_dir: Path, keep: int, current: Path) -> None:
    """Keep the newest `keep` complete checkpoints (always `current`, the one just published);
    remove crashed saves; restore or remove what a killed re-save left (`.old_step_*`)."""
    for step, old in _steps(run_dir, ".old_"):
        twin = run_dir / f"step_{step:08d}"
        if is_complete(twin):
            shutil.rmtree(old, ignore_errors=True)
        elif is_complete(old):  # killed between moving the old copy aside and publishing
            shutil.rmtree(twin, ignore_errors=True)
            os.rename(old, twin)
    done = [p for _, p in _steps(run_dir) if is_complete(p)]
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
    found = {s: p for s, p in _steps(run_dir, ".old_") if is_complete(p)}
    found.update({s: p for s, p in _steps(run_dir) if is_complete(p)})
    order = [found[s] for s in sorted(found, reverse=True)]
    target = _pointer(run_dir)
    if target is not None and target in order:
        return order[order.index(target) :]
    return order


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete step_* dir; None when there is none."""
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


def quarantine(path: Path) -> Path:
    """Move a checkpoint that failed verification out of the way (rank 0), for inspection."""
    dest = path.with_name(f".corrupt_{path.name.removeprefix('.old_')}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f".corrupt_{path.name.removeprefix('.old_')}.{n}")
    os.rename(path, dest)
    return dest
