"""Shared pytest setup: every test starts from the same global RNG state and has its tier checked
(tests/helpers/tiers.py: a Python subprocess needs `slow`, ranks need `distributed`); the
session's cache of 1-process loss curves (the reference of every multi-rank CLI parity test, in
whichever folder)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _check_tier(request, monkeypatch):
    from tests.helpers.tiers import guard

    guard(request.node, monkeypatch)


@pytest.fixture(scope="session")
def single_process_curve(tmp_path_factory):
    """curve(overrides) -> the 1-process per-step losses, computed once per session."""
    from tests.helpers.cli_runs import SingleProcessCurves

    return SingleProcessCurves(tmp_path_factory.mktemp("single_process"))
