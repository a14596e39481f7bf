"""Spawn small gloo process groups for tests, with hard timeouts and a clean teardown.

`run_ranks(fn, world, *args, timeout=...)` starts `world` spawned processes that see the torchrun
environment (moe_train.parallel.launch_env.torchrun_env, on a free loopback port), calls
`fn(rank, world, *args)` in each and returns the list of return values (picklable).
A rank that raises fails the test with its traceback; a run that exceeds `timeout` is killed and
fails. `fn` is responsible for init (e.g. via init_parallel) and should end with
`teardown(state)`; the child runs `teardown()` again as a safety net (skipped, with a plain exit,
when `fn.skip_teardown` is true: for tests that break the group on purpose).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from moe_train.parallel.launch_env import free_port, torchrun_env
from tests.helpers.tiers import require_distributed

DIST_CALLS = (
    "init_process_group",
    "is_initialized",
    "new_group",
    "get_world_size",
    "get_rank",
    "broadcast",
    "all_reduce",
    "all_to_all_single",
    "barrier",
)


def forbid_torch_distributed(monkeypatch: Any) -> None:
    """Make every torch.distributed entry point the package uses raise (pytest's monkeypatch
    undoes it): for code that must run without a process group."""
    import torch.distributed as dist

    def forbid(name: str):
        def fail(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"torch.distributed.{name} was called")

        return fail

    for name in DIST_CALLS:
        monkeypatch.setattr(dist, name, forbid(name))


def teardown(state: Any = None) -> None:
    """Drop references, gc, barrier, destroy the process group (the recipe that avoids gloo's
    abort at exit)."""
    from moe_train.parallel import teardown_process_group

    if state is not None and hasattr(state, "shutdown"):
        state.shutdown()
        return
    teardown_process_group()


def _child(fn, rank: int, world: int, port: int, out_dir: str, env: dict, args: tuple) -> None:
    os.environ.update({**torchrun_env(rank, world, port), "OMP_NUM_THREADS": "1", **env})
    import torch

    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    with open(path.with_suffix(".tmp"), "wb") as f:
        pickle.dump(result, f)
    os.replace(path.with_suffix(".tmp"), path)
    if result[0] != "ok":
        os._exit(1)  # peers may be gone: skip the barrier
    if getattr(fn, "skip_teardown", False):
        os._exit(0)  # the test broke the group on purpose
    teardown()


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    allow_missing: bool = False,
    exit_codes: list[int | None] | None = None,
) -> list[Any]:
    """Run fn(rank, world, *args) on `world` spawned ranks; return their results by rank.

    allow_missing: ranks that exit without a result (e.g. killed on purpose) give None instead of
    failing the run. exit_codes: a list to receive each rank's process exit status.
    """
    require_distributed(f"spawns {world} ranks")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_child, args=(fn, r, world, port, out_dir, env or {}, args))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if exit_codes is not None:
            exit_codes.extend(p.exitcode for p in procs)
        results: list[Any] = []
        errors: list[str] = []
        for r in range(world):
            path = Path(out_dir) / f"rank{r}.pkl"
            if not path.exists():
                results.append(None)
                if not allow_missing and r not in hung:
                    errors.append(f"rank {r} exited ({procs[r].exitcode}) without a result")
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {r} raised:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s; killed")
        return results
