"""The tier check of tests/helpers/tiers.py: an unmarked test may not start a Python process or
spawn ranks (it would slow the fast tier down); other programs are fine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import tiers
from tests.helpers.distributed import run_ranks


def _rank(rank: int, world: int) -> int:
    return rank


def test_an_unmarked_test_may_not_start_python():
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_an_unmarked_test_may_not_spawn_ranks():
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.distributed"):
        run_ranks(_rank, 2)


def test_an_unmarked_test_may_run_other_programs():
    assert subprocess.run(["sh", "-c", "exit 3"]).returncode == 3


@pytest.mark.slow
def test_a_slow_test_may_start_python():
    out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    assert out.stdout.strip() == "42"


def test_processes_torch_starts_for_itself_are_not_the_tests(tmp_path):
    # inductor's compile-worker pool (torch 2.7) runs a script inside the torch package
    import torch

    script = tmp_path / "worker.py"
    script.write_text("print('started')\n")
    inside = os.path.join(os.path.dirname(torch.__file__), "_inductor", "compile_worker")
    assert tiers._torch_helper([sys.executable, os.path.join(inside, "__main__.py")])
    assert not tiers._torch_helper([sys.executable, str(script)])
    assert not tiers._torch_helper([sys.executable, "-c", "pass"])
