#!/usr/bin/env bash
# The GPU machine's checks (device tool): build the extension with that machine's python3 (torch,
# triton, nvcc, ninja, pytest and pytest-xdist are preinstalled; nothing can be downloaded there),
# then test, sanitize and benchmark, each step under its own time limit AND the whole script under
# one budget (GPU_CHECK_BUDGET seconds, default 540: a device command may run 600), so that it
# always ends with its summary instead of being killed. Every selected step runs even when an
# earlier one failed (a GPU call should bring back everything it can); a step the budget cannot
# fit is reported "not run (budget)". The script exits 1 if ANY step failed or did not run.
#
#   bash scripts/gpu_check.sh                               # on the GPU machine, every step
#   GPU_CHECK_STEPS="build ops gpu bench" bash scripts/gpu_check.sh          # first call
#   GPU_CHECK_STEPS="memcheck racecheck recipe benchmodel" bash scripts/gpu_check.sh
#                                                           # second call on the still-warm machine
#                                                           # (the built extension is kept there)
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh               # rehearsal without a GPU: the CPU parts
#   GPU_CHECK_DRY=1 GPU_CHECK_DRY_BUILD=1 PYTHON=/path/to/other/python3 bash scripts/gpu_check.sh
#                                                           # the same, building with another python
#                                                           # (e.g. the GPU machine's torch / triton);
#                                                           # in a copy of the tree: the build
#                                                           # replaces the checkout's extension
#
# What comes back ($OUT keeps at most 8 files on the device tool): summary.txt (each step's status
# and seconds), logs.tar.gz (every log: gpu.txt, build.log, ops-tests.log, gpu-tests.log,
# memcheck.log, racecheck.log, bench.md, recipe.log, recipe-report.md, bench-model.md, the JSON
# files), bench.json and bench.md (the op benchmark), bench-model.json. The summary is also printed
# last, so the reply's output tail holds it.
#
# Steps, in this order (limits in seconds, overridable as STEP_LIMIT_<name>):
#   build      pip install --no-build-isolation --no-deps --no-index -e . with that python3 (CUDA kernels
#              for this GPU's architecture); see BUILD below
#   compile    (rehearsal only) pycompress bench triton-compile --quick: the Triton kernels through
#              Triton's compiler and ptxas for sm_90, without a GPU
#   ops        pytest tests/ops (every op, every backend incl. cuda and compiled triton), in
#              parallel processes when pytest-xdist is there (Triton compiles are single-threaded)
#   gpu        pytest -m gpu over the whole suite (artifacts, benchmarks, QAT, pruning on CUDA)
#   bench      pycompress bench ops --json (BENCH_ARGS adds options, e.g. "--op depthwise")
#   memcheck   compute-sanitizer memcheck on the CUDA kernels' parity tests
#   racecheck  compute-sanitizer racecheck on the depthwise kernels (shared-memory tiles)
#   recipe     a tiny KD + prune + QAT recipe on CUDA, automatic backend, a few hundred steps
#   benchmodel pycompress bench model on the recipe's artifact (torch rows on CPU and GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$(date +%s)
OUT=${OUT:-/tmp/pycompress-gpu}
LOGS=${GPU_CHECK_LOGS:-/tmp/pycompress-gpu-logs}  # everything; packed into $OUT/logs.tar.gz at the end
rm -rf "$LOGS"; mkdir -p "$OUT" "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYCOMPRESS_REQUIRE_EXT=1
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}
RESERVE=20      # seconds kept for packing the logs and printing the summary
MIN_STEP=30     # a step is not started with less than this left
ALL_STEPS="build compile ops gpu bench memcheck racecheck recipe benchmodel"
STEPS=" ${GPU_CHECK_STEPS:-$ALL_STEPS} "
for s in $STEPS; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "GPU_CHECK_STEPS: unknown step '$s' (steps: $ALL_STEPS)"; exit 2;; esac
done
if [ "$DRY" != "1" ] && ! command -v nvidia-smi >/dev/null; then
  echo "no nvidia-smi: not a GPU machine (GPU_CHECK_DRY=1 rehearses the script without a GPU)"; exit 2
fi
: > "$LOGS/summary.txt"
FAILED=0

selected() { case "$STEPS" in *" $1 "*) return 0;; *) return 1;; esac; }

# step NAME LIMIT LOG -- command...: run with a time limit (clipped to what the budget has left),
# record status and seconds
step() {
  local name=$1 limit=$2 log=$3; shift 3
  selected "$name" || return 0
  local var="STEP_LIMIT_${name}"; limit=${!var:-$limit}
  local left=$(( T_START + BUDGET - RESERVE - $(date +%s) ))
  if [ "$left" -lt "$MIN_STEP" ]; then
    FAILED=1
    printf '%-10s %-40s\n' "$name" "not run (budget: ${left}s left of ${BUDGET}s)" | tee -a "$LOGS/summary.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$LOGS/$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  if [ $rc -ne 0 ]; then
    FAILED=1; what="FAILED (exit $rc$([ $rc -eq 124 ] && echo ", time limit ${limit}s"))"
  fi
  printf '%-10s %-40s %5ss  %s\n' "$name" "$what" "$dt" "$log" | tee -a "$LOGS/summary.txt"
  tail -4 "$LOGS/$log" | sed 's/^/    /'
  return 0
}
skip() { selected "$1" && printf '%-10s %-40s\n' "$1" "skipped ($2)" | tee -a "$LOGS/summary.txt"; return 0; }

{ if [ "$DRY" = "1" ]; then echo "dry run (no GPU)"; else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "steps:$STEPS budget ${BUDGET}s"; } > "$LOGS/gpu.txt" 2>&1
cat "$LOGS/gpu.txt"

XDIST=""
if [ "$DRY" != "1" ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST="-n ${GPU_CHECK_WORKERS:-8}"
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
# The build: pycompress installed editable into that python (the extension compiled in place, and
# the Triton kernels' directory kernels/ importable as pycompress.kernels, which `setup.py
# build_ext --inplace` alone does not give). pip is kept off the network (--no-index) and off the
# dependencies (already there). If that pip or setuptools cannot do an editable install, the
# extension is built in place and pycompress/kernels becomes a link to kernels/ in this copy of
# the tree. GPU_CHECK_BUILD=inplace takes the second way directly.
BUILD='set -e
rm -rf build pycompress/_C*.so
if [ "${GPU_CHECK_BUILD:-editable}" = editable ] && "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  echo "installed editable"
else
  echo "building in place, pycompress/kernels -> ../kernels"
  "$PY" setup.py build_ext --inplace
  [ -e pycompress/kernels ] || ln -s ../kernels pycompress/kernels
fi
"$PY" -c "import pycompress.kernels.sparse_mask, pycompress._ext as e; print(\"pycompress from\", pycompress.__file__, \"CUDA kernels compiled:\", e.cuda_built()); assert e.cuda_built()"'
if [ "$DRY" = "1" ] && [ "${GPU_CHECK_DRY_BUILD:-0}" != "1" ]; then
  # the rehearsal keeps the checkout's extension (built by scripts/setup.sh) unless asked to build
  skip build "dry run: using the extension scripts/setup.sh built (GPU_CHECK_DRY_BUILD=1 builds)"
elif selected build; then
  step build 300 build.log env PY="$PY" bash -c "$BUILD"
elif ! "$PY" -c "import pycompress.kernels, pycompress._C" 2>/dev/null; then
  echo "pycompress is not built here (add 'build' to GPU_CHECK_STEPS)" | tee -a "$LOGS/summary.txt"; FAILED=1
fi

if [ "$DRY" = "1" ]; then
  # Without a GPU, the Triton kernels still go through Triton's compiler and ptxas for sm_90 (every
  # kernel, registers and spills); on the GPU the op tests below compile them for real.
  step compile 300 triton-compile.md "$PY" -m pycompress.cli bench triton-compile --quick --json "$LOGS/triton-compile.json"
  export TRITON_INTERPRET=1
  step ops 300 ops-tests.log "$PY" -m pytest -q -p no:cacheprovider tests/ops -x -k "sparse_mask and pack"
  skip gpu "dry run"
else
  step ops 300 ops-tests.log "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/ops
  step gpu 240 gpu-tests.log "$PY" -m pytest -q -p no:cacheprovider $XDIST -m gpu tests
fi

if [ "$DRY" = "1" ]; then
  step bench 300 bench.md "$PY" -m pycompress.cli bench ops --op sparse_mask --size 100000 --device cpu --json "$LOGS/bench.json"
else
  # 64M-element roofline cases (256 MB in fp32, five times the H100's L2): a quarter of the default's time
  step bench 240 bench.md "$PY" -m pycompress.cli bench ops --size ${BENCH_SIZE:-67108864} ${BENCH_ARGS:-} --json "$LOGS/bench.json"
fi

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ "$DRY" != "1" ] && [ -x "$SAN" ]; then
  step memcheck 240 memcheck.log "$SAN" --tool memcheck --error-exitcode 3 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops \
      -k "cuda and (matches_reference or non_finite or learnable or test_sparse_mask or test_depthwise) and not large"
  step racecheck 180 racecheck.log "$SAN" --tool racecheck --error-exitcode 3 "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/ops/test_depthwise.py -k "cuda and depthwise_conv2d_matches_reference and (k3s1p1d1 or k5s2p2d1 or k7s2p3d2)"
else
  skip memcheck "$([ "$DRY" = "1" ] && echo 'dry run' || echo 'compute-sanitizer not found')"
  skip racecheck "$([ "$DRY" = "1" ] && echo 'dry run' || echo 'compute-sanitizer not found')"
fi

# A tiny KD + prune + QAT recipe on synthetic data: the whole training path on the GPU with the
# automatic backend (about 300 optimizer steps), ending in an exported artifact.
RUN=/tmp/pycompress-gpu-run
RECIPE="$LOGS/tiny-gpu.yaml"
DEVICE=$([ "$DRY" = "1" ] && echo cpu || echo cuda)
cat > "$RECIPE" <<EOF
name: tiny-gpu
seed: 0
device: $DEVICE
kernel_backend: auto
data: {dataset: synthetic, batch_size: 64, eval_batch_size: 256,
       options: {num_classes: 10, image_size: 32, in_channels: 1, length: $([ "$DRY" = "1" ] && echo 640 || echo 6400)}}
model: {name: mobilenet_student, args: {width_mult: 1.0}}
teacher: {name: lenet5, args: {input_size: 32}}
stages:
  - {name: teacher, kind: train, target: teacher, epochs: 1, optimizer: {name: adamw, lr: 2.0e-3}}
  - {name: kd, kind: distill, epochs: 1, optimizer: {name: sgd, lr: 0.05, momentum: 0.9},
     distill: {kind: hinton, alpha: 0.5, temperature: 4}}
  - {name: prune, kind: prune, epochs: 1, optimizer: {name: sgd, lr: 0.02, momentum: 0.9},
     distill: {kind: hinton, alpha: 0.5, temperature: 4},
     prune: {criterion: global_magnitude, sparsity: 0.75, schedule: regrow, update_interval: 20}}
  - {name: qat4, kind: quantize, epochs: 1, optimizer: {name: adamw, lr: 5.0e-4},
     distill: {kind: hinton, alpha: 0.5, temperature: 4},
     quantize: {weight_bits: 4, act_bits: 8, first: {weight_bits: 8}, last: {weight_bits: 8}, calib_batches: 2}}
  - {name: export, kind: export, formats: [pcz, fp16, uint8]}
EOF
rm -rf "$RUN"
step recipe 180 recipe.log "$PY" -m pycompress.cli run "$RECIPE" --out "$RUN" --no-progress
[ -f "$RUN/report.md" ] && cp "$RUN/report.md" "$LOGS/recipe-report.md"
if [ -f "$RUN/model.pcz" ]; then
  step benchmodel 120 bench-model.md "$PY" -m pycompress.cli bench model "$RUN/model.pcz" --no-onnx \
      --device "$DEVICE" --json "$LOGS/bench-model.json"
elif selected benchmodel; then
  printf '%-10s %-40s\n' benchmodel "not run (no artifact from the recipe step)" | tee -a "$LOGS/summary.txt"; FAILED=1
fi

echo "total $(( $(date +%s) - T_START ))s of a ${BUDGET}s budget; exit $FAILED" >> "$LOGS/summary.txt"
# At most 8 files come back from $OUT: the summary, the op benchmark and every log in one archive.
for f in summary.txt bench.json bench.md bench-model.json; do [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/"; done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo "---- summary ($OUT/summary.txt; every log in $OUT/logs.tar.gz)"; cat "$LOGS/summary.txt"
exit $FAILED
