"""The linters agree on their versions: pyproject.toml's `lint` extra (what CI installs) pins the
ruff that .pre-commit-config.yaml runs, and CI's lint step runs ruff and mypy from that extra."""

from __future__ import annotations

import re

from tests.helpers import REPO


def _pins(text: str, package: str) -> set[str]:
    return set(re.findall(rf'"{package}==([0-9][^"]*)"', text))


def test_pre_commit_runs_the_ruff_that_ci_installs():
    pyproject = (REPO / "pyproject.toml").read_text()
    hooks = (REPO / ".pre-commit-config.yaml").read_text()
    assert len(_pins(pyproject, "ruff")) == 1, "pin ruff once, in the lint extra"
    assert _pins(hooks, "ruff") == _pins(pyproject, "ruff")
    assert len(_pins(pyproject, "mypy")) == 1


def test_ci_lints_with_the_lint_extra_and_type_checks():
    ci = (REPO / ".ci" / "run").read_text()
    lint = ci[ci.index("lint() {") : ci.index("}", ci.index("lint() {"))]
    assert '-e ".[lint]"' in lint
    for command in ("ruff check .", "ruff format --check .", "mypy"):
        assert command in lint, command
    assert '"moe-train[lint]"' in (REPO / "pyproject.toml").read_text()  # dev includes it
