#!/usr/bin/env bash
# The GPU check of issue 14, in one go on a fresh GPU machine (the device tool's H100/H200: torch
# 2.11+cu130, Python 3.12, nvcc, pytest; no network). From the repository root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine; results and log in $OUT
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # rehearsal on a CPU machine (see below)
#
# Steps, each under its own time limit (about 6 minutes in all on an H100):
#   0. wheels: if .whl/ holds wheels (benchmarks/gpu_wheels.sh puts hydra-core, omegaconf and the
#      antlr4 runtime there; the steps below do not import them, the rest of the package does),
#      they are installed into a temporary folder
#   1. build the fused-ops extension with its CUDA kernels for this GPU (a failure stops here)
#   2. pytest -m cuda tests/gpu (kernels vs reference, grouped GEMM vs loop, no host syncs,
#      3 bf16 training steps vs CPU fp32)
#   3. benchmarks/moe_layer.py --device cuda: coarse and fine presets, grouped vs loop vs dense
#   4. benchmarks/dispatch_combine.py --device cuda: GB/s vs a device-to-device copy
#   5. benchmarks/gpu_train.py: ~1.1B-parameter MoE LM, 100 steps, tokens/s and MFU
#   6. benchmarks/compile.py --device cuda --bf16: the `base` model eager vs trainer.compile=blocks
#      (tokens/s, compile time, loss agreement)
#   7. benchmarks/scaling.py --quick: the all-to-all overlap off vs on, 2 processes, ep = 2 (gloo on
#      the machine's CPU cores: one GPU cannot host an NCCL all-to-all between two ranks)
# Writes to $OUT (default benchmarks/results/gpu_check): gpu_check.log, pytest.xml,
# moe_layer_cuda.json, dispatch_combine_cuda.json, gpu_train.json, compile_cuda.json,
# scaling.json, summary.json. A failed step
# is recorded and the later steps still run; the exit status is the number of failed steps.
#
# GPU_CHECK_DRY=1 runs every step on the CPU with tiny sizes (--device cpu --quick, the GPU tests
# collected and skipped), to catch syntax and argument errors before spending device time.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 1
dry="${GPU_CHECK_DRY:-0}"
OUT="${OUT:-$repo/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
: >"$log"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
t_start=$(date +%s)
failed=()

say() { echo "gpu_check [$(( $(date +%s) - t_start )) s]: $*" | tee -a "$log"; }

# step NAME LIMIT_S CMD...: run it with a time limit, its output into the log, and record it
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  say "== $name (limit ${limit} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  say "== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  [ "$rc" = 0 ] || failed+=("$name")
  return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if [ "$dry" = "1" ]; then
  dev=cpu
  quick=(--quick)
  train_args=(--device cpu --quick)
else
  dev=cuda
  quick=()
  train_args=(--steps 100 --warmup 10)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
    | tee -a "$log"
  # build for this GPU only (minutes saved); the extension goes to a folder of its own
  arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-16}"
  export MOE_TRAIN_EXT_DIR="${MOE_TRAIN_EXT_DIR:-/tmp/moe_train_ext}"
fi
"$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name() if torch.cuda.is_available()
else None)' 2>&1 | tee -a "$log"

# 1. the extension: with CUDA kernels on the GPU machine; a failure is fatal (no silent fallback)
if ! step build 300 "$py" -m moe_train.ops.extension; then
  [ "$dry" = "1" ] || { say "the extension did not build: stopping"; exit 1; }
fi

# 2. the GPU tests (on the CPU rehearsal: collected, all skipped)
step pytest 240 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/gpu \
  --junitxml="$OUT/pytest.xml" -o addopts="-ra"

# 3-5. the benchmarks, JSON into $OUT
if [ "$dry" = "1" ]; then
  step moe_layer 300 "$py" benchmarks/moe_layer.py --device cpu --quick --backends auto loop \
    --out "$OUT"
else
  step moe_layer 240 "$py" benchmarks/moe_layer.py --device cuda --preset coarse fine \
    --backends grouped loop --capacity-factor none 1.25 --repeats 7 --warmup 2 --out "$OUT"
fi
step dispatch_combine 120 "$py" benchmarks/dispatch_combine.py --device "$dev" "${quick[@]}" \
  --out "$OUT"
step gpu_train 240 "$py" benchmarks/gpu_train.py "${train_args[@]}" --out "$OUT"
if [ "$dry" = "1" ]; then
  step compile 300 "$py" benchmarks/compile.py --device cpu --quick --out "$OUT"
else
  step compile 150 "$py" benchmarks/compile.py --device cuda --bf16 --models base --batch 8 \
    --steps 10 --warmup 3 --out "$OUT"
fi
step overlap 120 "$py" benchmarks/scaling.py --quick --procs 1 2 --out "$OUT"

"$py" - "$OUT" "${failed[@]}" <<'EOF' 2>&1 | tee -a "$log"
import json, sys, pathlib

out, failed = pathlib.Path(sys.argv[1]), sys.argv[2:]
summary = {"failed_steps": failed}
for name in ("moe_layer_cuda", "moe_layer", "dispatch_combine_cuda", "dispatch_combine", "gpu_train",
             "compile_cuda", "compile", "scaling"):
    path = out / f"{name}.json"
    if path.exists():
        summary[name] = str(path.name)
train = out / "gpu_train.json"
if train.exists():
    t = json.loads(train.read_text())
    summary["train"] = {k: t.get(k) for k in ("tokens_per_s", "mfu", "step_ms", "params_total")}
    summary["device"] = t["machine"].get("gpu", "cpu")
for name in ("compile_cuda", "compile"):
    path = out / f"{name}.json"
    if path.exists():
        summary["compile"] = [
            {k: r.get(k) for k in ("model", "speedup", "compile_s", "loss_max_rel_diff")}
            for r in json.loads(path.read_text())["results"]
        ]
scaling = out / "scaling.json"
if scaling.exists():
    summary["overlap"] = [
        {k: r.get(k) for k in ("processes", "overlap", "step_s", "a2a_s_per_step")}
        for r in json.loads(scaling.read_text())["results"]
    ]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("summary:", json.dumps(summary))
EOF
say "done in $(( $(date +%s) - t_start )) s; failed steps: ${failed[*]:-none}"
exit "${#failed[@]}"
