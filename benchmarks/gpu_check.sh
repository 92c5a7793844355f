#!/usr/bin/env bash
# The GPU check, one call on one GPU (under 8 minutes): the CUDA-only tests, then step cost,
# perturbation bandwidth and memory against the planner (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                  # writes benchmarks/results/gpu/
#   bash benchmarks/gpu_check.sh --dry-run [DIR]  # on a CPU: the CUDA-only tests must collect, and the
#                                                 # benchmark runs end to end on a tiny OPT (CI runs this)
#
# Needs torch with CUDA, transformers and pytest; DeepSpeed is not needed. Runs from the checkout
# without installing it (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--dry-run" ]; then
  OUT=${2:-$(mktemp -d)}
  mkdir -p "$OUT"
  # Exit code 5 (nothing selected) fails the dry run: the GPU check must have tests to run.
  "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests > "$OUT/gpu_tests.txt"
  "$PY" benchmarks/gpu_check.py --dry-run --results "$OUT"
  exit 0
fi

OUT=benchmarks/results/gpu
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true
status=0
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" || status=$?
timeout 300 "$PY" benchmarks/gpu_check.py --results "$OUT" 2>&1 | tee "$OUT/gpu_check.log" || status=$?
exit $status
