#!/usr/bin/env bash
# CI check of the user's install (issue 17): in a fresh venv that already holds torch (CPU build,
# FUSED_POOL_PIP_TORCH, default torch==2.13.0: installs from local disk on the project's
# machines), a plain `pip install .` (pip's default build isolation) must
#   1. not install or download any other torch, and be quick (it builds a pure-Python wheel);
#   2. give the "cpp" backend on first use: the first import compiles the C++ kernels for that
#      torch into a fresh cache folder (FUSED_POOL_CACHE_DIR), and a fused op on "cpp" (forward
#      and backward) matches the "torch" reference;
#   3. load them from the cache on the second run.
# Prints the install time, the first-call (build) time and the cached-call time. Never touches
# .venv. MAX_JOBS (default 2) bounds the compile jobs. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
TORCH_REQ=${FUSED_POOL_PIP_TORCH:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
VENV=$work/venv
PY=$VENV/bin/python
fail() { echo "ci-pip: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the user's environment: a venv with torch, nothing else ------------------------------------
t=$(now)
"${PYTHON:-python3}" -m venv "$VENV"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_REQ" numpy > "$work/venv.log" 2>&1 \
  || { tail -n 40 "$work/venv.log" >&2; fail "installing $TORCH_REQ into a fresh venv failed"; }
torch_before=$("$PY" -m pip list --disable-pip-version-check --format=freeze | grep -i '^torch==')
echo "ci-pip: fresh venv with $torch_before in $(since "$t") s"

# --- plain pip install (build isolation on) -----------------------------------------------------
t=$(now)
# -v: pip then also shows what it installs into the isolated build environment.
(cd "$work" && "$PY" -m pip install -v --disable-pip-version-check "$ROOT") > "$work/install.log" 2>&1 \
  || { tail -n 40 "$work/install.log" >&2; fail "pip install . failed"; }
install_s=$(since "$t")
torch_after=$("$PY" -m pip list --disable-pip-version-check --format=freeze | grep -i '^torch==')
if [ "$torch_after" != "$torch_before" ]; then
  fail "pip install . replaced $torch_before by $torch_after"
fi
# No torch wheel may be fetched, not even into the isolated build environment.
if grep -E '(Collecting|Downloading|Processing|Using cached)[^(]*torch' "$work/install.log"; then
  fail "pip install . fetched a torch (lines above; full log in $work/install.log)"
fi
grep -q 'fused_pool-.*-py3-none-any.whl' "$work/install.log" \
  || fail "pip install . did not build the pure-Python wheel: $(grep -i 'wheel' "$work/install.log")"
echo "ci-pip: plain \`pip install .\` in ${install_s} s ($torch_after kept, pure-Python wheel)"

# --- first call: builds the C++ kernels; second call: from the cache ----------------------------
export FUSED_POOL_CACHE_DIR=$work/cache
cat > "$work/check.py" <<'EOF'
import os
import sys
import time

start = time.monotonic()
import torch  # noqa: E402

import fused_pool as fp  # noqa: E402  (the first import builds the kernels)
from fused_pool import _dispatch, _extension  # noqa: E402

imported = time.monotonic() - start
want = sys.argv[1]
venv = sys.argv[2]
assert os.path.realpath(fp.__file__).startswith(os.path.realpath(venv)), fp.__file__
ok, why = fp.backend_status()["cpp"]
assert ok, f"the cpp backend is not available: {why}"
origin = _extension.STATE["origin"]
assert origin == want, f"kernels from {origin!r} ({_extension.STATE['path']}), expected {want!r}"
assert _dispatch.resolve(torch.device("cpu")) == "cpp", "auto does not pick cpp on the CPU"

sys.path.insert(0, sys.argv[3])  # scripts/ of the checkout (its fused_pool/ stays off the path)
from cpp_smoke import check  # noqa: E402

check("ci-pip")
print(f"ci-pip: kernels: {origin} ({_extension.STATE['path']}); import took {imported:.1f} s")
EOF
cd "$work"  # not the checkout: its fused_pool/ must not shadow the installed one
t=$(now)
"$PY" check.py built "$VENV" "$ROOT/scripts" || fail "first call on the cpp backend"
first_s=$(since "$t")
t=$(now)
"$PY" check.py cache "$VENV" "$ROOT/scripts" || fail "second call on the cpp backend (cached build)"
cached_s=$(since "$t")
"$PY" -m fused_pool info
echo "ci-pip: install ${install_s} s; first call (compiles the C++ kernels, MAX_JOBS=$MAX_JOBS) ${first_s} s; cached call ${cached_s} s"
