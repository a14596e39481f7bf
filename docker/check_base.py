"""Docker build check: does the base image's PyTorch meet moe-train's floor, and was it built for
every GPU the image targets? Run before anything is installed, so that a base image that cannot
serve the image's GPUs fails the build instead of the first job on a V100.

    python docker/check_base.py [pyproject.toml]    (targets: $TORCH_CUDA_ARCH_LIST)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def torch_floor(pyproject: Path) -> str:
    """The X.Y of the ``torch>=X.Y`` dependency: the one place the floor is declared."""
    if m := re.search(r'^\s*"torch>=([0-9]+\.[0-9]+)",?\s*$', pyproject.read_text(), re.MULTILINE):
        return m.group(1)
    raise SystemExit(f"check_base: no 'torch>=X.Y' dependency in {pyproject}")


def problems(torch_version: str, arch_flags: str, floor: str, targets: str) -> list[str]:
    """What is wrong with a base torch: its version against the floor (PEP 440, as pip compares:
    2.7.0a0 is older than 2.7), and its compiled kernels (``sm_70 sm_80 ...``) against the
    targets (``7.0;8.0;9.0``)."""
    from torch.torch_version import TorchVersion

    found: list[str] = []
    if not TorchVersion(torch_version) >= floor:
        found.append(f"torch {torch_version} is older than the floor {floor} (pyproject.toml)")
    built = set(arch_flags.split())
    for target in filter(None, re.split(r"[;\s]+", targets)):
        sm = "sm_" + target.split("+")[0].replace(".", "")
        if sm not in built:
            found.append(
                f"torch has no {sm} kernels (TORCH_CUDA_ARCH_LIST has {target}; "
                f"built for: {arch_flags or 'no GPU'})"
            )
    return found


def main() -> int:
    import torch

    pyproject = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    floor = torch_floor(pyproject)
    arch_flags = torch._C._cuda_getArchFlags() if torch.version.cuda else ""
    targets = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    found = problems(torch.__version__, arch_flags, floor, targets)
    for p in found:
        print(f"check_base: {p}", file=sys.stderr)
    if found:
        print(
            "check_base: pick another BASE_IMAGE (docker/Dockerfile says which work)",
            file=sys.stderr,
        )
        return 1
    print(
        f"check_base: torch {torch.__version__} (CUDA {torch.version.cuda}) >= {floor}, "
        f"kernels for {targets or 'no GPU'}: {arch_flags}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
