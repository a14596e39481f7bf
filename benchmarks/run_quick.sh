#!/usr/bin/env bash
# Run every benchmark with --quick (CI-sized) to keep them working. Results go to a scratch folder
# (OUT=dir to keep them), so the committed benchmarks/results/*.json are not overwritten.
# Peers that are not installed (deepspeed, fairscale, matplotlib) are skipped with a note.
#   benchmarks/run_quick.sh            # about 1-3 minutes on 2 cores
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
out=${OUT:-$(mktemp -d -t moe_bench_quick.XXXXXX)}
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
for script in dispatch_combine moe_layer comm_volume quality scaling memory prepare document_mask compile; do
    echo "=== $script --quick"
    start=$SECONDS
    "$python" "$here/$script.py" --quick --out "$out"
    echo "=== $script: $((SECONDS - start)) s"
done
echo "results in $out"
