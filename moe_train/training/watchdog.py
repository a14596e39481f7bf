"""A stuck run says where it is stuck: a watchdog thread per rank.

The loop marks its phases (`with watchdog.phase("step" | "eval" | "save", step)`); the thread
wakes every second and, when the current phase has run longer than its limit, this rank writes
run_dir/stall/rank_<r>.txt (its step, phase, seconds in it, how many collectives it has issued,
and every thread's Python stack by faulthandler; on NCCL also PyTorch's flight-recorder dump,
rank_<r>.nccl_trace.pkl), waits up to REPORT_WAIT_S for the other ranks' files, and the lowest
rank that reported writes stall/report.txt naming the ranks behind: those at an earlier step,
or at the same step with fewer collectives issued (a rank blocked in a collective has issued
it; the one it waits for has not), and the ranks that wrote nothing (dead, or holding the GIL).
A rank that sees another's report (the stall folder exists: one stat a second) reports at once,
so ranks whose own limit is longer (waiting inside a save or an eval) are in the report too.
Then the process exits with EXIT_STALLED, rather than holding its GPUs until the time limit.

Why files in the run folder and no per-step heartbeat: the progress a rank reports is read in
memory by its own thread, so healthy steps cost nothing (no store round trip, no file write per
step); only a stalled rank writes, once. The run folder is on a filesystem every rank shares
(checkpoints need that already).

Limits: trainer.stall_timeout_s seconds (fixed), or by default AUTO_MARGIN_S above the slowest
phase of that kind seen so far (FIRST_LIMIT_S before the first of its kind: the first step
compiles and warms up; saves and evaluations are timed apart from steps).
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_STALLED = 124  # timeout(1)'s status: the run timed out waiting for itself
AUTO_MARGIN_S = 300.0
FIRST_LIMIT_S = 900.0
REPORT_WAIT_S = 30.0
STALL_DIR = "stall"
TRACE_BUFFER = "2000"  # entries of NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE)


def enable_flight_recorder() -> None:
    """Before the process group exists: keep NCCL's last collectives (the flight recorder) so a
    stall report can include them; the user's own settings win. The variable is
    TORCH_FR_BUFFER_SIZE in new torch (2.11 and 2.13 warn that TORCH_NCCL_TRACE_BUFFER_SIZE is
    deprecated); older releases read only TORCH_NCCL_TRACE_BUFFER_SIZE."""
    import torch

    if "TORCH_NCCL_TRACE_BUFFER_SIZE" in os.environ:
        return
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    old = (major, minor) < (2, 11)
    os.environ.setdefault(
        "TORCH_NCCL_TRACE_BUFFER_SIZE" if old else "TORCH_FR_BUFFER_SIZE", TRACE_BUFFER
    )


class Watchdog:
    """One per rank (`start`, `close`); `phase(kind, step)` marks what the loop is doing."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world: int,
        timeout_s: float | None,
        *,
        skip_groups: tuple[Any, ...] = (),
        report_wait_s: float = REPORT_WAIT_S,
    ):
        self.dir = Path(run_dir) / STALL_DIR
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.skip_groups, self.report_wait_s = skip_groups, report_wait_s
        self.kind, self.step, self.since = "start", 0, time.monotonic()
        self.slowest: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s != 0

    def start(self) -> None:
        """Move an earlier run's stall folder aside (rank 0; call before a collective that
        every rank passes before its first phase), then watch."""
        if not self.enabled:
            return
        if self.rank == 0 and self.dir.exists():
            old = self.dir.with_name(f"{STALL_DIR}.previous")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.dir, old)
        self.since = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="moe_train_watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextmanager
    def phase(self, kind: str, step: int) -> Iterator[None]:
        started = self.since = time.monotonic()  # the thread reads since, then kind
        self.kind, self.step = kind, step
        try:
            yield
        finally:
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), time.monotonic() - started)
            self.since = time.monotonic()
            self.kind = "between steps"

    def limit(self, kind: str) -> float:
        """Seconds the phase `kind` may run without ending."""
        if self.timeout_s is not None:
            return self.timeout_s
        seen = self.slowest.get("step" if kind == "between steps" else kind)
        return FIRST_LIMIT_S if seen is None else seen + AUTO_MARGIN_S

    def _watch(self) -> None:
        tick = min(1.0, max(0.05, self.limit("step") / 20))
        while not self._stop.wait(tick):
            kind, step, since = self.kind, self.step, self.since
            stuck = time.monotonic() - since
            # another rank's report: this one reports too, whatever its own limit (a rank that
            # waits in a save or an eval for a rank stuck in a step has a longer one)
            if stuck > self.limit(kind) or (stuck > tick and self.dir.is_dir()):
                self._report(kind, step, stuck)

    # --- the report -------------------------------------------------------------------------

    def _report(self, kind: str, step: int, stuck: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = {
            "rank": self.rank, "step": step, "phase": kind, "seconds": round(stuck, 1),
            "collectives": collectives_issued(self.skip_groups), "pid": os.getpid(),
        }  # fmt: skip
        path = self.dir / f"rank_{self.rank:05d}.txt"
        with open(path.with_suffix(".tmp"), "w") as f:
            f.write(json.dumps(mine) + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(path.with_suffix(".tmp"), path)
        _dump_nccl_trace(self.dir / f"rank_{self.rank:05d}.nccl_trace.pkl")
        print(
            f"[rank {self.rank}] moe-train: no progress for {stuck:.0f} s in {kind} of step "
            f"{step} (limit {self.limit(kind):.0f} s, trainer.stall_timeout_s): stacks in {path}",
            file=sys.stderr,
            flush=True,
        )
        reports = self._gather()
        if min(reports) == self.rank:
            text = stall_report(reports, self.world)
            (self.dir / "report.txt").write_text(text)
            print(f"[rank {self.rank}] moe-train: {text.strip()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_STALLED)

    def _gather(self) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + self.report_wait_s
        while True:
            found = {}
            for p in self.dir.glob("rank_*.txt"):
                try:
                    first = p.read_text().splitlines()[0]
                    rec = json.loads(first)
                except (OSError, ValueError, IndexError):
                    continue
                found[int(rec["rank"])] = rec
            if len(found) >= self.world or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def collectives_issued(skip: tuple[Any, ...] = ()) -> int:
    """Collectives this rank has issued over all its process groups (their sequence numbers),
    leaving out `skip` (e.g. the checkpoint group, whose background saves run on their own
    clock). Equal on every rank of a healthy SPMD run between steps."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0
        groups = list(dist.distributed_c10d._world.pg_map)
        issued = [g._get_sequence_number_for_group() for g in groups if g not in skip]  # type: ignore[attr-defined]  # not in torch's stubs
        return sum(issued)
    except Exception:  # noqa: BLE001 - a report without the count beats no report
        return -1


def stall_report(reports: dict[int, dict[str, Any]], world: int) -> str:
    """Who is behind, from every rank's (step, collectives issued): one paragraph."""
    missing = [r for r in range(world) if r not in reports]
    position = {r: (rec["step"], rec["collectives"]) for r, rec in reports.items()}
    ahead = max(position.values()) if position else (0, 0)
    behind = sorted(r for r, p in position.items() if p < ahead)
    lines = ["stall report: the run made no progress within trainer.stall_timeout_s"]
    if behind:
        lines.append(f"ranks behind: {_ranks(behind)} (the others wait for them)")
    if missing:
        lines.append(f"no report from ranks {_ranks(missing)} (dead, or holding the GIL)")
    if not behind and not missing:
        lines.append("no rank is behind: every rank waits at the same point (see the stacks)")
    for r in sorted(reports):
        rec = reports[r]
        lines.append(
            f"rank {r}: step {rec['step']}, {rec['phase']} for {rec['seconds']} s, "
            f"{rec['collectives']} collectives issued"
        )
    lines.append("every rank's Python stack: rank_<r>.txt beside this report")
    return "\n".join(lines) + "\n"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _dump_nccl_trace(path: Path) -> None:
    """PyTorch's NCCL flight recorder (when this process has NCCL and it was enabled)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return
        import torch._C._distributed_c10d as c10d

        dump = c10d._dump_nccl_trace  # type: ignore[attr-defined]  # NCCL builds only
        path.write_bytes(dump())
    except Exception:  # noqa: BLE001 - no NCCL, no recorder: the stacks still tell
        return
