"""The test tiers (CONTRIBUTING.md), checked while the tests run.

A test that spawns ranks is marked `distributed`; one that starts another Python process (a
console script, a benchmark, a build probe) is marked `slow`. Then the fast tier,
`pytest -m "not distributed and not slow"`, holds only in-process tests, and a new test that
forgets its mark fails with what to add instead of quietly slowing the fast tier down.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest

_current: dict[str, Any] = {"node": None}


def _marked(node: Any, *names: str) -> bool:
    return node is None or any(node.get_closest_marker(n) for n in names)


def require_distributed(what: str) -> None:
    """Fail the running test unless it is marked `distributed` (called where ranks start)."""
    node = _current["node"]
    if not _marked(node, "distributed"):
        pytest.fail(f"{node.nodeid} {what}: mark it @pytest.mark.distributed", pytrace=False)


def _is_python(argv: Any) -> bool:
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    first = os.fsdecode(argv[0]) if argv else ""
    return first == sys.executable or os.path.basename(first).startswith("python")


def _torch_helper(argv: Any) -> bool:
    """A process torch starts for itself (inductor's compile-worker pool on torch 2.7), not one
    the test starts: its script lies inside the torch package."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin or "")
    return bool(torch_dir) and any(torch_dir in os.fsdecode(a) for a in argv[1:])


def guard(node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the duration of one test: remember it (for `require_distributed`) and, unless it is
    marked `slow` or `distributed`, make starting a Python process fail it."""
    monkeypatch.setitem(_current, "node", node)
    if _marked(node, "slow", "distributed"):
        return
    init = subprocess.Popen.__init__

    def checked_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        if _is_python(args) and not _torch_helper(args):
            pytest.fail(
                f"{node.nodeid} starts a Python process ({args!r:.120}): "
                "mark it @pytest.mark.slow (the fast tier runs in-process tests only)",
                pytrace=False,
            )
        init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
