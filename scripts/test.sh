#!/usr/bin/env bash
# The test command: set-up (idempotent), the linter and formatter check (ruff, configured in
# pyproject.toml), then the whole suite. The Triton kernels run under the
# Triton interpreter on the CPU (TRITON_INTERPRET=1); GPU tests (marker gpu) skip without CUDA.
# A missing compiled extension is an error (PYCOMPRESS_REQUIRE_EXT=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export PYCOMPRESS_REQUIRE_EXT=1
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec .venv/bin/python -m pytest -q "$@"
