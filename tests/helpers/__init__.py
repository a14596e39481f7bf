"""What the tests share: multi-rank runs, CLI runs, small models and configs of each area.

`python_env()` is the environment of a child Python process that imports `tests.helpers` too."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def python_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (so `import tests.helpers...` works in
    a subprocess), plus `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
