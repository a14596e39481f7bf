#!/usr/bin/env bash
# CI: the CUDA kernels of moe_train.ops must compile on this GPU-less machine. Two levels:
#   1. `nvcc -c` of kernels/*.cu alone (CUDA headers + the shared index header), checked to
#      assemble machine code for every target:
#      a. with the CUDA 13 toolkit for sm_80, sm_90 (CUDA 13 cannot target Volta);
#      b. with CUDA 11.8 (Debian's, provisioned by .ci/cuda118_toolkit.sh) for sm_70, sm_80, sm_90;
#   2. the full CUDA extension built against the CUDA build of torch 2.14.1 in its own virtual
#      environment (outside the repo, reused between runs), then loaded without a GPU.
# Idempotent: the venv, the 11.8 toolkit and the build cache are reused; ninja recompiles only
# what changed.
# Environment:
#   CUDA_HOME                 toolkit of 1a and 2 (default /usr/local/cuda-13.0, else nvcc's)
#   MOE_TRAIN_CUDA_ARCHS      level-1a archs (default "80 90")
#   MOE_TRAIN_CUDA118_ARCHS   level-1b archs (default "70 80 90")
#   MOE_TRAIN_SKIP_CUDA118=1  skip level 1b (no apt here): sm_70 is then NOT compiled
#   MOE_TRAIN_CUDA_VENV       venv of level 2 (default ${TMPDIR:-/tmp}/moe_train_cuda_venv)
#   MOE_TRAIN_CUDA_TORCH      torch of level 2 (default 2.14.1)
#   MOE_TRAIN_SKIP_CUDA_LINK=1  skip level 2
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
kernels="$repo/kernels"
tmp="${TMPDIR:-/tmp}"

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda-13.0
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else
    echo "cuda_build: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
    exit 1
  fi
fi
export CUDA_HOME
nvcc="$CUDA_HOME/bin/nvcc"
[ -x "$nvcc" ] || { echo "cuda_build: $nvcc not found or not executable" >&2; exit 1; }
echo "cuda_build: toolkit $CUDA_HOME ($("$nvcc" --version | grep -o 'release [0-9.]*'))"

# ---- level 1: nvcc -c of the kernel sources alone, SASS for every target ----
objdir="$(mktemp -d "$tmp/moe_train_nvcc.XXXXXX")"
trap 'rm -rf "$objdir"' EXIT
# compile LABEL NVCC "ARCHS" [extra nvcc flags...]: ptxas -v names the target of every kernel it
# assembles, which proves machine code (not only PTX) for each arch (minimal toolkits lack cuobjdump).
compile() {
  local label=$1 nvcc_bin=$2 archs=$3
  shift 3
  local gencode=() a cu obj log t0 counts
  for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
  for cu in "$kernels"/*.cu; do
    obj="$objdir/$label.$(basename "$cu").o"
    log="$obj.ptxas.log"
    echo "cuda_build: level $label: nvcc -c $(basename "$cu") for sm_${archs// /, sm_}" \
      "($("$nvcc_bin" --version | grep -o 'release [0-9.]*'))"
    t0=$(date +%s)
    "$nvcc_bin" -c -O3 -std=c++17 -I"$kernels" -Xptxas -v "${gencode[@]}" "$@" -o "$obj" "$cu" \
      >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    counts=""
    for a in $archs; do
      n=$(grep -c "Compiling entry function .* for 'sm_$a'" "$log" || true)
      [[ $n -gt 0 ]] || { cat "$log" >&2; echo "cuda_build: no sm_$a code in $obj" >&2; exit 1; }
      counts+="${counts:+,} sm_$a: $n kernels"
    done
    echo "cuda_build: level $label: ok in $(( $(date +%s) - t0 )) s;$counts"
  done
}
compile 1a "$nvcc" "${MOE_TRAIN_CUDA_ARCHS:-80 90}"
if [ "${MOE_TRAIN_SKIP_CUDA118:-0}" = "1" ]; then
  echo "cuda_build: level 1b SKIPPED (MOE_TRAIN_SKIP_CUDA118=1): sm_70 was not compiled"
else
  nvcc118="$(bash "$repo/.ci/cuda118_toolkit.sh")"
  compile 1b "$nvcc118" "${MOE_TRAIN_CUDA118_ARCHS:-70 80 90}" -ccbin g++-11
fi

# ---- level 2: full extension against the CUDA build of torch ----
if [ "${MOE_TRAIN_SKIP_CUDA_LINK:-0}" = "1" ]; then
  echo "cuda_build: level 2 SKIPPED (MOE_TRAIN_SKIP_CUDA_LINK=1): the extension was not linked" \
    "against the CUDA build of torch"
  exit 0
fi
venv="${MOE_TRAIN_CUDA_VENV:-$tmp/moe_train_cuda_venv}"
torch_version="${MOE_TRAIN_CUDA_TORCH:-2.14.1}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  echo "cuda_build: level 2: creating venv $venv"
  python3 -m venv "$venv"
fi
if ! "$py" -c "import sys, torch; sys.exit(not (torch.__version__.startswith('$torch_version') and torch.version.cuda))" 2>/dev/null; then
  echo "cuda_build: level 2: pip install torch==$torch_version (CUDA build) into $venv"
  "$py" -m pip install -q "torch==$torch_version" numpy
fi
"$py" -c "import torch; print('cuda_build: level 2: torch', torch.__version__, 'CUDA', torch.version.cuda)"

export MOE_TRAIN_EXT_DIR="${MOE_TRAIN_CUDA_EXT_DIR:-$tmp/moe_train_cuda_ext}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
echo "cuda_build: level 2: building the extension (archs $TORCH_CUDA_ARCH_LIST) in $MOE_TRAIN_EXT_DIR"
t0=$(date +%s)
(cd "$repo" && PYTHONPATH="$repo" "$py" -m moe_train.ops.extension)
echo "cuda_build: level 2: build step took $(( $(date +%s) - t0 )) s"

echo "cuda_build: level 2: loading the built library in a fresh process (no GPU, no build)"
(cd "$repo" && PYTHONPATH="$repo" "$py" - <<'EOF'
import torch

from moe_train.ops import extension

# As a run finds the kernels the image ships: prebuilt, loaded without building.
extension._build(verbose=False, build=False)
assert extension._state["prebuilt"] and extension._state["cuda"], extension._state
lib = extension._state["path"]
cpu_only = ("csr_by_row", "gate", "gate_backward")
for op in ("dispatch", "dispatch_backward", "combine", "combine_backward", "jitter", *cpu_only):
    for key in ("CPU",) if op in cpu_only else ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_train::{op}", key), (op, key)
# The CPU kernels of the same library against the reference.
from moe_train.ops.reference import combine_reference, dispatch_reference

x, index = torch.randn(16, 40), torch.randint(0, 16, (24,))
buf = torch.ops.moe_train.dispatch(x, index, None)
assert torch.equal(buf, dispatch_reference(x, index))
from moe_train.ops._custom import csr_by_row

row_ptr, perm = csr_by_row(index, 16)
y = torch.ops.moe_train.combine(buf, None, index, row_ptr, perm, 16)
torch.testing.assert_close(y, combine_reference(buf, None, index, 16))
print(f"cuda_build: level 2: ok: {lib} loads, CPU and CUDA kernels registered, "
      f"CUDA available here: {torch.cuda.is_available()}")
EOF
)
