#!/usr/bin/env bash
# Rebuild everything that ships beside the embedded tiny model, in order:
# the model, its CPU latency profile, its outcome tables (RL train / val / test) and its accuracy report.
# Usage: bash scripts/build_embedded.sh   (a trained model can be reused: SKIP_TRAIN=1, its profile
# SKIP_PROFILE=1; extra training flags for every step, e.g. --device cuda, go in TRAIN_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
W=envs/vlm/weights/tiny
if [ -z "${SKIP_TRAIN:-}" ]; then
  # The shipped model's lineage: one recipe per step under training/recipes/ (`python -m training.lineage`
  # lists them), each starting from the model of the step before. A step whose model exists is skipped;
  # a half-finished one resumes. TRAIN_ARGS come last, so they win over a recipe's values.
  for recipe in $(python -m training.lineage --pending); do
    # shellcheck disable=SC2086
    python scripts/train_vlm.py --recipe "$recipe" ${TRAIN_ARGS:-}
  done
fi
# Latency depends on shapes, not weights: a profile timed on a quiet machine can be kept for retrained
# weights (SKIP_PROFILE=1); one timed on a busy machine inflates every stage.
[ -n "${SKIP_PROFILE:-}" ] || python scripts/profile_latency.py --model tiny --device cpu --out "$W/latency_cpu.json"
mkdir -p "$W/outcomes"
# shards run as Ray tasks, one per core; an interrupted build resumes. Tables of other weights in
# runs/outcomes are refused (they record a hash of the weights): move them away when the model changed.
for spec in "test 2 2000" "rl_train 4 600" "val 1 1000"; do
  set -- $spec
  python scripts/build_outcomes.py --model tiny --seed "$2" --n "$3" --executor ray --out "runs/outcomes/$1"
done
for split in train val test; do
  src=runs/outcomes/$([ "$split" = train ] && echo rl_train || echo "$split")
  cp "$src/table.npz" "$W/outcomes/$split.npz"
  cp "$src/pareto.png" "reports/pareto_tiny_$split.png"
done
# the directory's manifest (assets.json): each file's provenance, so its tables are checked against it
python -c "from envs.prepare import describe_directory; describe_directory('$W')"
python scripts/eval_vlm.py --model tiny --seed 2 --n 2000 --outcomes runs/outcomes/test --out reports/tiny_eval_seed2.json
