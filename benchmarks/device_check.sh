#!/usr/bin/env bash
# Issue 6's one prepared GPU run (about 10 minutes on an H100): the fast path checked against the
# plain path and both timed on the molmoe-1b preset, then the project's profiler on both paths.
# Usage on the device machine: bash benchmarks/device_check.sh   (results land in $OUT or benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 300 python benchmarks/fast_path.py --preset molmoe-1b --device cuda --out "$OUT/fast_path_molmoe1b_gpu.json" \
  2>&1 | tee "$OUT/fast_path_molmoe1b_gpu.txt"
timeout 280 python scripts/profile_latency.py --preset molmoe-1b --device cuda --dtype bfloat16 --fast \
  --repeats 3 --warmup 1 --mape-n 20 --out "$OUT/latency_molmoe1b_gpu.json" 2>&1 | tail -5 | tee "$OUT/latency_molmoe1b_gpu.txt"
