#!/usr/bin/env bash
# KL ablation on the self-distillation corpus: DeepSpec's loss (kl 0) vs + KL(target || draft) (kl 1),
# same data, seed, warm start (the zoo DSpark drafter), one OpenMP thread each, side by side.
# Resume either arm with the same command plus --resume.
set -euo pipefail
cd "$(dirname "$0")/../../.."
for kl in 0 1; do
  OMP_NUM_THREADS=1 setsid nohup .venv/bin/python examples/train_drafter.py --family dspark \
    --out examples/training/runs/dspark-kl$kl --corpus examples/training/corpus/smollm2-135m \
    --corpus-shards 0:5 --holdout-shards 5:6 --init-from dspark_sglang/zoo/smollm2-135m-dspark \
    --steps 30000 --warmup 0.01 --vocab-sample 4096 --kl-alpha $kl --eval-seqs 16 \
    --eval-every 400 --save-every 400 --log-every 50 --max-minutes "${MAX_MINUTES:-35}" --seed 0 "$@" \
    > examples/training/runs/dspark-kl$kl.log 2>&1 < /dev/null &
done
