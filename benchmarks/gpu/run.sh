#!/usr/bin/env bash
# The GPU workstation check, prepared as one device call (at most ~8 minutes):
#   run(command="bash benchmarks/gpu/run.sh", timeout_s=540)
# Builds the C++ tiler with the machine's own Python (its PyTorch, no downloads: the
# image has scikit-build-core, pybind11, cmake and ninja), then writes
# $OUT/gpu.json (figures) and $OUT/gpu-tests.txt (the GPU tests' output).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
"$PY" -c "import defectscope._tiling, torch; print('tiler ok; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# The GPU tests first (short): the CUDA path against the CPU FP32 one.
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/engines/test_torch_dense.py \
  -k "cuda or gpu" 2>&1 | tail -15 | tee "$OUT/gpu-tests.txt" || true
timeout 420 "$PY" benchmarks/gpu/bench_gpu.py --out "$OUT/gpu.json"
