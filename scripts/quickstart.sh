#!/usr/bin/env bash
# The main job: set-up (idempotent), then the quickstart recipe end to end on Fashion-MNIST:
# LeNet-5 teacher -> KD of the MobileNet-style student -> 8-bit and 4-bit QAT under KD -> report.
# Run directory: runs/quickstart (report.md, report.json, per-stage checkpoints, logs, curves).
# Running it again continues an interrupted run (--resume) or, when finished, rewrites the report.
# Extra arguments go to `pycompress run`, e.g. --set qat4.epochs=3 --out runs/other.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CUDA kernels only where a GPU can run them: on a machine without one, compiling them is the
# test command's check of the CUDA code (scripts/test.sh, CI), not something the quickstart needs.
if [ -z "${PYCOMPRESS_CUDA:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export PYCOMPRESS_CUDA=0
fi
bash scripts/setup.sh
export PYCOMPRESS_REQUIRE_EXT=1
exec .venv/bin/pycompress run recipes/quickstart.yaml --out runs/quickstart --resume "$@"
