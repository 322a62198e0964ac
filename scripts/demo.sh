#!/usr/bin/env bash
# The main job on a fresh CPU machine: set up, then serve the bundled small target with DSPARK and
# print what it generates, with speculative-decoding statistics. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python examples/demo_cpu.py "$@"
