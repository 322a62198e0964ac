#!/usr/bin/env bash
# The server-level losslessness test at full size: a DSPARK server (real SGLang CPU engine, tiny random
# target, the target-at-another-temperature drafter) sampled SAMPLES times per prompt and sampling
# configuration, KS-tested against the exact target distribution, beside the two negative controls that
# must fail (benchmarks/server_distribution.py). The test suite runs the same at a small size.
# Usage: bash scripts/distribution.sh [SAMPLES (default 2000)] [--out report.json]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
samples="${1:-2000}"
shift || true
.venv/bin/python -m dspark_sglang.benchmarks.server_distribution --samples "$samples" "$@"
