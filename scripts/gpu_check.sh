#!/usr/bin/env bash
# One call on the GPU machine (device tool): build the extension with that machine's python3
# (torch, triton, nvcc, ninja and pytest are preinstalled; nothing can be downloaded there), then
# run every check and benchmark, each step with its own time limit. Every step runs even when an
# earlier one failed (one GPU call should bring back everything it can), and the script exits 1 if
# ANY step failed; $OUT/summary.txt lists each step's status and time. Logs land in $OUT:
# gpu.txt, build.log, ops-tests.log, gpu-tests.log, memcheck.log, racecheck.log, bench.json /
# bench.md, recipe.log (+ recipe-report.md), bench-model.md.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh # rehearsal without a GPU: the CPU parts, GPU steps skipped
#
# Steps (limits in seconds, overridable as STEP_LIMIT_<name>):
#   build      python3 setup.py build_ext --inplace (CUDA kernels for this GPU's architecture)
#   compile    (rehearsal only) pycompress bench triton-compile --quick: the Triton kernels through
#              Triton's compiler and ptxas for sm_90, without a GPU
#   ops        pytest tests/ops (every op, every backend incl. cuda and compiled triton)
#   gpu        pytest -m gpu over the whole suite (artifacts, benchmarks, QAT, pruning on CUDA)
#   memcheck   compute-sanitizer memcheck on the CUDA kernels' parity tests
#   racecheck  compute-sanitizer racecheck on the depthwise kernels (shared-memory tiles)
#   bench      pycompress bench ops --json
#   recipe     a tiny KD + prune + QAT recipe on CUDA, automatic backend, a few hundred steps
#   benchmodel pycompress bench model on the recipe's artifact (torch rows on CPU and GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pycompress-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYCOMPRESS_REQUIRE_EXT=1
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" != "1" ] && ! command -v nvidia-smi >/dev/null; then
  echo "no nvidia-smi: not a GPU machine (GPU_CHECK_DRY=1 rehearses the script without a GPU)"; exit 2
fi
: > "$OUT/summary.txt"
FAILED=0

# step NAME LIMIT LOG -- command...: run with a time limit, record status and seconds
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local var="STEP_LIMIT_${name}"; limit=${!var:-$limit}
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  if [ $rc -ne 0 ]; then
    FAILED=1; what="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
  fi
  printf '%-10s %-40s %5ss  %s\n' "$name" "$what" "$dt" "$log" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/$log" | sed 's/^/    /'
  return 0
}
skip() { printf '%-10s %-40s\n' "$1" "skipped ($2)" | tee -a "$OUT/summary.txt"; }

{ if [ "$DRY" = "1" ]; then echo "dry run (no GPU)"; else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  command -v nvcc >/dev/null && nvcc --version | tail -2; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
if [ "$DRY" = "1" ]; then
  # the rehearsal keeps the checkout's extension (built by scripts/setup.sh)
  skip build "dry run: using the extension scripts/setup.sh built"
else
  rm -rf build pycompress/_C*.so
  step build 420 build.log "$PY" setup.py build_ext --inplace
fi

if [ "$DRY" = "1" ]; then
  # Without a GPU, the Triton kernels still go through Triton's compiler and ptxas for sm_90 (every
  # kernel, registers and spills); on the GPU the op tests below compile them for real.
  step compile 300 triton-compile.md "$PY" -m pycompress.cli bench triton-compile --quick --json "$OUT/triton-compile.json"
  export TRITON_INTERPRET=1
  step ops 600 ops-tests.log "$PY" -m pytest -q -p no:cacheprovider tests/ops -x -k "sparse_mask and pack"
  skip gpu "dry run"
else
  step ops 600 ops-tests.log "$PY" -m pytest -q -p no:cacheprovider tests/ops
  step gpu 420 gpu-tests.log "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
fi

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ "$DRY" != "1" ] && [ -x "$SAN" ]; then
  step memcheck 420 memcheck.log "$SAN" --tool memcheck --error-exitcode 3 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops \
      -k "cuda and (matches_reference or non_finite or learnable or test_sparse_mask or test_depthwise) and not large"
  step racecheck 300 racecheck.log "$SAN" --tool racecheck --error-exitcode 3 "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/ops/test_depthwise.py -k "cuda and depthwise_conv2d_matches_reference and (k3s1p1d1 or k5s2p2d1 or k7s2p3d2)"
else
  skip memcheck "$([ "$DRY" = "1" ] && echo 'dry run' || echo 'compute-sanitizer not found')"
  skip racecheck "$([ "$DRY" = "1" ] && echo 'dry run' || echo 'compute-sanitizer not found')"
fi

if [ "$DRY" = "1" ]; then
  step bench 300 bench.md "$PY" -m pycompress.cli bench ops --op sparse_mask --size 100000 --device cpu --json "$OUT/bench.json"
else
  step bench 420 bench.md "$PY" -m pycompress.cli bench ops ${BENCH_ARGS:-} --json "$OUT/bench.json"
fi

# A tiny KD + prune + QAT recipe on synthetic data: the whole training path on the GPU with the
# automatic backend (about 300 optimizer steps), ending in an exported artifact.
RECIPE="$OUT/tiny-gpu.yaml"
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
rm -rf "$OUT/tiny-gpu"
step recipe 420 recipe.log "$PY" -m pycompress.cli run "$RECIPE" --out "$OUT/tiny-gpu" --no-progress
[ -f "$OUT/tiny-gpu/report.md" ] && cp "$OUT/tiny-gpu/report.md" "$OUT/recipe-report.md"
if [ -f "$OUT/tiny-gpu/model.pcz" ]; then
  step benchmodel 300 bench-model.md "$PY" -m pycompress.cli bench model "$OUT/tiny-gpu/model.pcz" --no-onnx \
      --device "$DEVICE" --json "$OUT/bench-model.json"
else
  skip benchmodel "no artifact from the recipe step"; FAILED=1
fi
rm -rf "$OUT/tiny-gpu/stages"  # checkpoints are not worth bringing back

echo "---- summary ($OUT/summary.txt)"; cat "$OUT/summary.txt"
exit $FAILED
