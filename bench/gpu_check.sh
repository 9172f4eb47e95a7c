#!/usr/bin/env bash
# The prepared GPU check: ONE call on a lent NVIDIA H200 machine (no network; torch, Triton, nvcc,
# ninja, pytest and hypothesis preinstalled). Steps, most valuable first, each with its own time
# limit (a failed or timed-out step does not stop the later ones), 500 s in all so that a device
# call of 540 s holds them with room to start:
#   info          the GPU and `python -m fused_pool info`                                  30 s
#   test-triton   the contract suite on CUDA tensors, "triton" backend                    170 s
#   bench-triton  the benchmark at the GPU target shape (docs/performance.md), "triton"    150 s
#                 beside eager, torch.compile and the copy bandwidth
#   build         the C++/CUDA extension in place for sm_90                                 90 s
#   test-cpp      the contract suite on CUDA tensors, "cpp" backend (the CUDA kernels)      60 s
# then a short summary. Results and logs go to $OUT when set (the device tool's folder), else
# bench/results/gpu_check/. A rerun of any part: STEPS="build test-cpp" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
STEPS=${STEPS:-"info test-triton bench-triton build test-cpp"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# The cpp kernels come from the build step only: no first-use compile inside another step's limit.
export FUSED_POOL_JIT=0
summary=()

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-13s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
}

step info 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; $PY -m fused_pool info"
step test-triton 170 env FUSED_POOL_TEST_BACKENDS=triton "$PY" -m pytest tests -q --maxfail=30 \
  -k "(triton-cuda or triton_) and not compile_for_sm90" -p no:cacheprovider --junitxml="$OUT/junit-triton.xml"
step bench-triton 150 "$PY" -m fused_pool bench --backends triton --out "$OUT" --budget 0.3 \
  --repeats 10 --quiet
# In place (no pip, no network): fused_pool/_C*.so next to the sources.
step build 90 env FUSED_POOL_REQUIRE_EXT=1 FUSED_POOL_CUDA=1 "$PY" setup.py build_ext --inplace
step test-cpp 60 env FUSED_POOL_TEST_BACKENDS=cpp "$PY" -m pytest tests -q --maxfail=30 \
  -k "cpp-cuda" -p no:cacheprovider --junitxml="$OUT/junit-cpp.xml"

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
if [ -f "$OUT/results.csv" ]; then
  "$PY" - "$OUT/results.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'op':<21}{'impl':<10}{'mode':<7}{'ms':>9}{'%copy':>7}{'x eager':>9}{'x compile':>10}")
for r in rows:
    if r["impl"].startswith("fp:") or r["impl"] in ("compile",):
        f = lambda k, s: format(float(r[k]), s) if r[k] not in ("", "None") else "-"
        print(f"{r['op']:<21}{r['impl']:<10}{r['mode']:<7}{f('median_ms', '.3f'):>9}"
              f"{f('pct_copy_bw', '.0f'):>7}{f('speedup_vs_eager', '.2f'):>9}"
              f"{f('speedup_vs_compile', '.2f'):>10}")
PYEOF
fi
