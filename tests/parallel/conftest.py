"""Make tests/distributed_utils.py importable (here and in spawned ranks); the session's cache of
1-process loss curves."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def single_process_curve(tmp_path_factory):
    """curve(overrides) -> the 1-process per-step losses, computed once per session."""
    from cli_runs import SingleProcessCurves

    return SingleProcessCurves(tmp_path_factory.mktemp("single_process"))
