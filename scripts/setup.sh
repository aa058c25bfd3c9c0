#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian's Fashion-MNIST package, a virtual environment in .venv with torch 2.14.1 and
# torchvision 0.29.1, the test and runtime dependencies (with the onnx extra: onnx, onnxruntime, onnxscript, pinned), and
# pycompress built in place (the C++
# extension, plus the CUDA kernels when nvcc is found). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Real data: Fashion-MNIST from Debian (files under /usr/share/datasets/fashion-mnist).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 ninja numpy pyyaml tqdm matplotlib pytest \
  onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 torch-pruning==1.6.1 safetensors==0.8.0 ruff==0.17.6 \
  2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, onnx, onnxruntime" # fail loudly if the install above did not work
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# Build against the torch just installed (no build isolation); ninja rebuilds only what changed.
# Skipped when the installed extension is newer than every C++/CUDA source and the build files.
# PYCOMPRESS_CUDA (0 | 1 | auto, default auto) also decides whether an up-to-date CPU-only build must be
# rebuilt with the CUDA kernels (scripts/quickstart.sh builds them only where a GPU can use them).
WANT_CUDA=${PYCOMPRESS_CUDA:-auto}
HAVE_NVCC=0; [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && HAVE_NVCC=1
so=$(ls pycompress/_C*.so 2>/dev/null | head -1 || true)
if [ -n "$so" ] && [ -x .venv/bin/pycompress ] && (cd / && "$OLDPWD/.venv/bin/python" -c "
import sys, pycompress._ext as e
sys.exit(0 if e.cuda_built() or '$WANT_CUDA' == '0' or '$HAVE_NVCC' == '0' else 1)") 2>/dev/null \
   && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -type f 2>/dev/null | head -1)" ]; then
  echo "pycompress extension up to date ($so)"
else
  MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
    2>&1 | grep -v '^WARNING: Location' || true
fi
PYCOMPRESS_REQUIRE_EXT=1 .venv/bin/python -c "import pycompress, pycompress._ext as e; print('pycompress built; CUDA kernels compiled:', e.cuda_built())"
