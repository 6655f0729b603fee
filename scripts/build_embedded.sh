#!/usr/bin/env bash
# Rebuild everything that ships beside the embedded tiny model, in order:
# the model, its CPU latency profile, its outcome tables (RL train / val / test) and its accuracy report.
# Usage: bash scripts/build_embedded.sh [STEPS]   (a trained model can be reused: SKIP_TRAIN=1)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1200}
W=envs/vlm/weights/tiny
if [ -z "${SKIP_TRAIN:-}" ]; then
  python scripts/train_vlm.py --out runs/tiny_vlm --steps "$STEPS" --ship "$W"
fi
python scripts/profile_latency.py --model tiny --device cpu --out "$W/latency_cpu.json"
mkdir -p "$W/outcomes"
for spec in "rl_train 4 600 train" "val 1 200 val" "test 2 1000 test"; do
  set -- $spec
  OMP_NUM_THREADS=1 python scripts/build_outcomes.py --model tiny --seed "$2" --n "$3" --out "runs/outcomes/$1" &
done
wait
for split in train val test; do
  src=runs/outcomes/$([ "$split" = train ] && echo rl_train || echo "$split")
  cp "$src/table.npz" "$W/outcomes/$split.npz"
  cp "$src/pareto.png" "reports/pareto_tiny_$split.png"
done
python scripts/eval_vlm.py --model tiny --seed 2 --n 1000 --outcomes runs/outcomes/test --out reports/tiny_eval_seed2.json
