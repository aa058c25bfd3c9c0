#!/usr/bin/env bash
# The main job: set-up (idempotent), then the kernel benchmark on this machine. (Until the recipe
# layer lands, this is pycompress's end-to-end entry point.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYCOMPRESS_REQUIRE_EXT=1
.venv/bin/pycompress info
exec .venv/bin/pycompress bench ops --json bench-local.json "$@"
