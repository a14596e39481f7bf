"""torchrun's environment for processes started without torchrun (tests, benchmarks, a lone
DeepSpeed process): a free loopback port and the RANK/WORLD_SIZE/... variables."""

from __future__ import annotations

import os
import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_env(
    rank: int,
    world_size: int,
    port: int,
    *,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    master_addr: str = LOOPBACK,
) -> dict[str, str]:
    """The variables torchrun sets for `rank` of `world_size`; local_* default to one node."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "LOCAL_WORLD_SIZE": str(world_size if local_world_size is None else local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(port),
    }


def ensure_single_process_env() -> None:
    """Rank 0 of a world of 1 on a free loopback port, for a process started without torchrun;
    variables already set (e.g. by torchrun) win."""
    if "RANK" in os.environ:
        return
    for key, value in torchrun_env(0, 1, free_port()).items():
        os.environ.setdefault(key, value)
