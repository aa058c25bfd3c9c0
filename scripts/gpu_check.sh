#!/usr/bin/env bash
# One call on the GPU machine (device tool): build the extension with that machine's python3
# (torch, triton, nvcc, ninja and pytest are preinstalled; nothing can be downloaded there), run the
# op tests on the GPU (gpu-marked ones included), compute-sanitizer on the CUDA kernels, and the
# benchmark. Everything lands in $OUT: build.log, tests.log, sanitizer.log, racecheck.log, bench.json,
# bench.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pycompress-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYCOMPRESS_REQUIRE_EXT=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
rm -rf build pycompress/_C*.so
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=16
( time python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build ok"
python3 -m pytest -q tests/ops -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
if command -v compute-sanitizer >/dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  "$SAN" --tool memcheck --error-exitcode 3 python3 -m pytest -q -x -p no:cacheprovider tests/ops \
      -k "cuda and (matches_reference or non_finite or learnable or test_sparse_mask or test_depthwise) and not large" \
      > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer memcheck exit: $? (log: sanitizer.log)"; tail -3 "$OUT/sanitizer.log"
  # the depthwise kernels stage tiles in shared memory: check them for races too
  "$SAN" --tool racecheck --error-exitcode 3 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_depthwise.py \
      -k "cuda and depthwise_conv2d_matches_reference and (k3s1p1d1 or k5s2p2d1 or k7s2p3d2)" \
      > "$OUT/racecheck.log" 2>&1
  echo "compute-sanitizer racecheck exit: $? (log: racecheck.log)"; tail -3 "$OUT/racecheck.log"
fi
python3 -m pycompress.cli bench ops ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.md" | tail -70
