#!/usr/bin/env bash
# CI: the oldest supported PyTorch. pyproject.toml declares the floor once (`torch>=X.Y`); this
# script installs the newest X.Y.* release (`torch~=X.Y.0`, from PyPI: its Linux wheels are CUDA
# builds, which run on CPU when no GPU is visible) into a virtual environment of its own, outside
# the repo and reused between runs, and runs a named test selection there.
# Environment:
#   MOE_TRAIN_FLOOR_VENV   the venv (default ${TMPDIR:-/tmp}/moe_train_floor_venv; first run
#                          downloads about 3.5 GB: torch and its nvidia-* libraries)
#   MOE_TRAIN_FLOOR_TESTS  pytest selection, words without quotes (default: floor_tests below)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="${TMPDIR:-/tmp}"

# What must work on the floor: process groups, DDP, FSDP2, DCP checkpoints, the training loop,
# and the custom ops (torch.library). In-process: the training loop, precision, the ops and the
# grouped GEMM. Ranks: the ep parity suite (ep x dp with SAM's routing groups, DCP resharding,
# gradient sync), DDP/flat gradient sync, and two of the FSDP parity runs (the tree on dp=4, and
# switch with full recompute: FSDP2 and checkpoint hooks are what changes between versions); they
# compare gradient norms as well as losses: on the floor torch, gloo's reduce-scatter sums where
# FSDP asks for an average, which moe-train probes and corrects (parallel/fsdp.py). Not SAM's
# FSDP run: on the floor torch its 4-rank curve agrees with 1 process to 3e-7 for 13 steps, then
# one routing near-tie falls the other way at step 17 (grad norm 2.3e-4 apart, loss 2.2e-4 at
# step 20), which the newest torch's summation order happens not to meet (1.3e-5 at step 20).
# Not here, for CI time: the CLI parity
# runs (torchrun over the same code paths as the ep parity suite), the DeepSpeed runs
# (DeepSpeed's own version floor is tested in the main step), checkpoint resharding across
# layouts (DCP resharding runs here in test_ep_parity and test_checkpoint), the state-byte counts
# (the planner's arithmetic, torch-version-neutral).
floor_tests=(tests/parallel/test_ep_parity.py tests/parallel/test_grads.py tests/parallel/test_fsdp_parity.py
  tests/checkpoint/test_checkpoint.py tests/engines/test_fp16_overflow.py tests/training/test_train.py
  tests/ops tests/training/test_precision.py tests/experts/test_grouped.py
  -k "(not test_fsdp_on_four_ranks or tree or switch-ckpt_full) and not deepspeed")
if [[ -n "${MOE_TRAIN_FLOOR_TESTS:-}" ]]; then
  read -r -a floor_tests <<<"$MOE_TRAIN_FLOOR_TESTS"
fi

floor=$(sed -n 's/^ *"torch>=\([0-9][0-9]*\.[0-9][0-9]*\)",*$/\1/p' "$repo/pyproject.toml")
[[ -n "$floor" ]] || { echo "torch_floor: no \"torch>=X.Y\" dependency in pyproject.toml" >&2; exit 1; }
spec="torch~=$floor.0"

venv="${MOE_TRAIN_FLOOR_VENV:-$tmp/moe_train_floor_venv}"
py="$venv/bin/python"
if [[ ! -x "$py" ]]; then
  echo "torch_floor: creating $venv"
  python3 -m venv "$venv"
fi
t0=$(date +%s)
if ! "$py" -c "import sys, torch; sys.exit(not torch.__version__.startswith('$floor.'))" 2>/dev/null; then
  echo "torch_floor: pip install '$spec' (first run: a few GB, several minutes)"
fi
# Resolves against what is installed (fast when cached); re-points the editable install here.
log="$venv/pip-install.log"
"$py" -m pip install -q --disable-pip-version-check -e "${repo}[dev]" "$spec" >"$log" 2>&1 \
  || { cat "$log" >&2; exit 1; }
grep -v "^WARNING: Location .* is ignored" "$log" || true
"$py" -c "import torch; print('torch_floor: torch', torch.__version__, '(floor $floor) ready in' , $(( $(date +%s) - t0 )), 's')"
"$py" -c "import sys, torch; sys.exit(not torch.__version__.startswith('$floor.'))" \
  || { echo "torch_floor: the venv does not hold torch $floor.*" >&2; exit 1; }

# A build folder of its own (the kernels are built against this torch), never the GPU path.
export MOE_TRAIN_EXT_DIR="${MOE_TRAIN_FLOOR_EXT_DIR:-$tmp/moe_train_floor_ext}"
unset TORCH_CUDA_ARCH_LIST
echo "torch_floor: pytest ${floor_tests[*]}"
cd "$repo"
"$py" -m pytest -q -p no:cacheprovider "${floor_tests[@]}"
