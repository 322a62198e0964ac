#!/usr/bin/env bash
# Batch-size arm against dspark-kl0 (DeepSpec loss, 2 sequences x 16 anchors per step): 8 sequences x
# 16 anchors per step, the same schedule in anchors (7500 steps = kl0's 30000), same data, seed and warm
# start. Compared at equal anchors seen (plot_curves.py). Resume with the same command plus --resume.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OMP_NUM_THREADS=1 setsid nohup .venv/bin/python examples/train_drafter.py --family dspark \
  --out examples/training/runs/dspark-kl0-b8 --corpus examples/training/corpus/smollm2-135m \
  --corpus-shards 0:5 --holdout-shards 5:6 --init-from dspark_sglang/zoo/smollm2-135m-dspark \
  --steps 7500 --batch-seqs 8 --warmup 0.01 --vocab-sample 4096 --kl-alpha 0 --eval-seqs 16 \
  --eval-every 100 --save-every 100 --log-every 25 --max-minutes "${MAX_MINUTES:-45}" --seed 0 "$@" \
  > examples/training/runs/dspark-kl0-b8.log 2>&1 < /dev/null &
