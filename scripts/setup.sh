#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with torch, this package (building the
# C++ extension from csrc/ when sources exist) and the test/benchmark tools. Safe to re-run.
#
#   FUSED_POOL_TORCH   pip requirement for torch (default: torch==2.13.0 without a GPU, which
#                      installs from local disk on the project's machines; plain `torch` with one)
#   PYTHON             interpreter for the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
else
  has_gpu=0
fi

# Keep an installed torch that is new enough; otherwise install one.
if ! .venv/bin/python -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 5))' 2>/dev/null; then
  default_torch="torch==2.13.0"
  [ "$has_gpu" = 1 ] && default_torch="torch"
  echo "setup: installing ${FUSED_POOL_TORCH:-$default_torch}"
  "${PIP[@]}" "${FUSED_POOL_TORCH:-$default_torch}"
fi

# Triton always: on a machine without a GPU its interpreter runs the "triton" backend's tests.
extras="test,bench,dev,triton"
echo "setup: installing fused_pool[$extras] (editable; builds csrc/ if present)"
"${PIP[@]}" --no-build-isolation -e ".[$extras]"
.venv/bin/python -m fused_pool info
