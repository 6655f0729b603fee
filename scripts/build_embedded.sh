#!/usr/bin/env bash
# Rebuild everything that ships beside the embedded tiny model, in order:
# the model, its CPU latency profile, its outcome tables (RL train / val / test) and its accuracy report.
# Usage: bash scripts/build_embedded.sh [STEPS]   (a trained model can be reused: SKIP_TRAIN=1;
# extra training flags, e.g. --init DIR --reinit-vision or --device cuda, go in TRAIN_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-2600}
W=envs/vlm/weights/tiny
if [ -z "${SKIP_TRAIN:-}" ]; then
  # shellcheck disable=SC2086
  python scripts/train_vlm.py --out runs/tiny_vlm --steps "$STEPS" --vision-steps 600 --full-steps 900 --ship "$W" ${TRAIN_ARGS:-}
fi
python scripts/profile_latency.py --model tiny --device cpu --out "$W/latency_cpu.json"
mkdir -p "$W/outcomes"
# shards run as Ray tasks, one per core; an interrupted build resumes. Tables of an earlier model in
# runs/outcomes are refused by name: move them away when the model changed.
for spec in "test 2 2000" "rl_train 4 600" "val 1 200"; do
  set -- $spec
  python scripts/build_outcomes.py --model tiny --seed "$2" --n "$3" --executor ray --out "runs/outcomes/$1"
done
for split in train val test; do
  src=runs/outcomes/$([ "$split" = train ] && echo rl_train || echo "$split")
  cp "$src/table.npz" "$W/outcomes/$split.npz"
  cp "$src/pareto.png" "reports/pareto_tiny_$split.png"
done
python scripts/eval_vlm.py --model tiny --seed 2 --n 2000 --outcomes runs/outcomes/test --out reports/tiny_eval_seed2.json
