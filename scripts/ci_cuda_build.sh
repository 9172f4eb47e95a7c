#!/usr/bin/env bash
# CI check of the CUDA kernels on a machine WITHOUT a GPU: they must compile, load and register a
# CUDA kernel for every operator. Run after the CPU tests (it never touches .venv or the
# fused_pool/_C*.so they use):
#
#   1. a separate venv .venv-cuda with the CUDA build of torch (FUSED_POOL_CUDA_TORCH, default
#      torch==2.14.1: CUDA 13.0, ~5.5 GB, installs from local disk on the project's machines);
#   2. builds fused_pool._C with csrc/cuda/*.cu (FUSED_POOL_CUDA=1 FUSED_POOL_REQUIRE_EXT=1) for
#      TORCH_CUDA_ARCH_LIST (default 9.0 only: H200) with MAX_JOBS (default 2) into
#      build/cuda-ci/ (kept, so a rerun only recompiles what changed), printing each
#      translation unit's compile time;
#   3. imports the result from a staged copy of the package (build/cuda-ci/stage) and checks that
#      every operator of fused_pool/_schema.py has a CUDA and a CPU kernel;
#   4. runs a tiny CPU smoke test of that build (the cpp backend against the torch reference).
#
# Needs nvcc (CUDA_HOME, else the nvcc on PATH). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
elapsed() { echo "$(($(date +%s) - $1))"; }

VENV=.venv-cuda
PY=$ROOT/$VENV/bin/python
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# --- 1. environment -------------------------------------------------------------------------
t=$(date +%s)
if [ ! -x "$PY" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  echo "ci-cuda: installing ${FUSED_POOL_CUDA_TORCH:-torch==2.14.1} into $VENV"
  "${PIP[@]}" "${FUSED_POOL_CUDA_TORCH:-torch==2.14.1}"
fi
"${PIP[@]}" ninja setuptools wheel numpy  # numpy: torch warns at import without it
"$PY" -c 'import torch; print(f"ci-cuda: torch {torch.__version__}, CUDA {torch.version.cuda}")'
echo "ci-cuda: environment ready in $(elapsed "$t") s"

# The toolkit behind the nvcc on PATH (also when it is a wrapper script), found as setup.py finds
# it: fused_pool/_extension.py's find_cuda_home, loaded by path (no torch import needed).
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$("$PY" -c '
import importlib.util
spec = importlib.util.spec_from_file_location("_ext", "fused_pool/_extension.py")
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
print(ext.find_cuda_home() or "")')
  [ -n "$CUDA_HOME" ] || { echo "ci-cuda: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
  export CUDA_HOME
fi
echo "ci-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=${CUDA_HOME:-?}"

# --- 2. build -------------------------------------------------------------------------------
OUT=$ROOT/build/cuda-ci
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export FUSED_POOL_CUDA=1 FUSED_POOL_REQUIRE_EXT=1
t=$(date +%s)
echo "ci-cuda: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
# build_ext alone (no --inplace) writes the module under --build-lib only.
"$PY" setup.py --quiet build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" \
  > "$OUT/build.log" 2>&1 || {
  tail -n 80 "$OUT/build.log" >&2
  echo "ci-cuda: build FAILED (full log: $OUT/build.log)" >&2
  exit 1
}
echo "ci-cuda: build done in $(elapsed "$t") s"
# Per translation unit compile times from ninja's log (start/end in ms): the latest compile of
# each object, so an object this build did not need to recompile shows an earlier build's time.
ninja_log=$(find "$OUT/temp" -name .ninja_log | head -1)
if [ -n "$ninja_log" ]; then
  echo "ci-cuda: compile time per object (latest compile of each):"
  awk -F '\t' '!/^#/ { t[$4] = ($2 - $1) / 1000 } END { for (o in t) printf "  %7.1f s  %s\n", t[o], o }' \
    "$ninja_log" | sed "s|$OUT/temp/||" | sort -k3
fi

# --- 3. stage and check the registrations -------------------------------------------------
STAGE=$OUT/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
# The Python package without any _C built for the CPU venv, plus the module just built.
(cd "$ROOT" && find fused_pool -name '*.py' -print0 | xargs -0 -I{} cp --parents {} "$STAGE")
cp "$OUT"/lib/fused_pool/_C*.so "$STAGE/fused_pool/"
cd "$STAGE"  # the repository's fused_pool/ must not shadow the staged copy
t=$(date +%s)
"$PY" - <<'EOF'
import torch

import fused_pool as fp
from fused_pool._schema import SCHEMAS

assert fp._dispatch.__file__.startswith(__import__("os").getcwd()), fp._dispatch.__file__
has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = {
    key: [n for n in SCHEMAS if not has(f"fused_pool_cpp::{n}", key)] for key in ("CUDA", "CPU")
}
for key, names in missing.items():
    print(f"ci-cuda: {key} kernels: {len(SCHEMAS) - len(names)}/{len(SCHEMAS)}"
          + (f", MISSING: {', '.join(names)}" if names else ""))
assert not any(missing.values()), missing
probe = fp._dispatch.probe("cpp")
assert probe.ok, probe
print(f"ci-cuda: cpp backend devices (this machine): {sorted(probe.devices)}")
EOF
echo "ci-cuda: registration check done in $(elapsed "$t") s"

# --- 4. CPU smoke test of this build ------------------------------------------------------
t=$(date +%s)
# Run from the stage (cwd): the staged fused_pool with this build is the one imported.
PYTHONPATH="$STAGE" "$PY" "$ROOT/scripts/cpp_smoke.py" "ci-cuda: CPU smoke test of this build"
echo "ci-cuda: smoke test done in $(elapsed "$t") s"
echo "ci-cuda: done in $(elapsed "$t_start") s"
