#!/usr/bin/env bash
# One prepared GPU run (a few minutes on an H100): the fast path checked against the
# plain path and both timed on the molmoe-1b preset, the project's profiler on both paths, then
# where the fast path's time goes (each phase's replay against its kernels).
# Usage on the device machine: bash benchmarks/device_check.sh   (results land in $OUT or benchmarks/results)
# Exits non-zero if any step failed, so a caller can skip what depends on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout 200 python3 benchmarks/fast_path.py --preset molmoe-1b --device cuda --out "$OUT/fast_path_molmoe1b_gpu.json" \
  2>&1 | tee "$OUT/fast_path_molmoe1b_gpu.txt"
fast=$?
timeout 240 python3 scripts/profile_latency.py --preset molmoe-1b --device cuda --dtype bfloat16 --fast \
  --repeats 3 --warmup 1 --mape-n 20 --out "$OUT/latency_molmoe1b_gpu.json" 2>&1 | tr '\r' '\n' | grep -v "^profile: " \
  | tee "$OUT/latency_molmoe1b_gpu.txt"
profile=$?
timeout 120 python3 benchmarks/fast_path_kernels.py --preset molmoe-1b --device cuda \
  --out "$OUT/fast_path_kernels_molmoe1b_gpu.json" 2>&1 | grep -v "^USDT\|profiler_st" | tee "$OUT/fast_path_kernels_molmoe1b_gpu.txt"
kernels=$?
echo "device_check: fast_path exit $fast, profile exit $profile, kernels exit $kernels"
exit $((fast || profile || kernels))
