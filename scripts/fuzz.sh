#!/usr/bin/env bash
# Explore the property tests with fresh random inputs, RUNS times (default 20). The test suite
# (scripts/test.sh) replays a fixed set of examples; this is where new hostile inputs are found.
# Usage: bash scripts/fuzz.sh [RUNS] [pytest args...]   (default: every hypothesis test file)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DSPARK_HYPOTHESIS_PROFILE=explore
runs="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(grep -l "@given" tests/unit/*.py)
fi
for i in $(seq 1 "$runs"); do
    echo "== fuzz run $i/$runs"
    .venv/bin/python -m pytest -q -x -p no:cacheprovider "${targets[@]}"
done
