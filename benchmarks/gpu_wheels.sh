#!/usr/bin/env bash
# Put the wheels the GPU machine lacks (hydra-core, omegaconf and omegaconf's antlr4 runtime; all
# pure Python) into .whl/ of this checkout, ignored by git, for benchmarks/gpu_check.sh to install
# there (the device tool carries .whl when its call names it in `carry`). Run once, here:
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
py="${PYTHON:-python3}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (the version omegaconf 2.3 pins) is published as an sdist only
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
