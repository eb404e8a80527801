#!/usr/bin/env bash
# Everything a GPU session has to show, as one prepared command for a lent machine (H100/H200,
# python3 with torch, nvcc, pytest and transformers already installed; nothing to download):
#
#   bash bench/device_check.sh [STAGE ...]      stages: build test profile bench (default: all)
#
# The stages share one deadline, BUDGET seconds (default 560, inside the device tool's 600 s per
# command); each also has its own limit, so a slow one cannot eat the next one's time, and the
# benchmark suite, last, gets what is left (it rewrites its JSON after every case, so a cut-short
# run keeps the cases that finished). Logs go under $OUT (the device tool's return folder;
# /tmp/twinmerge-device elsewhere): env.txt build.log tests.log profile-run.log profile.txt
# bench.log gpu.json gpu.md (8 files: the most the device tool brings back).
# Expected on an H200 (16 cores): build ~2 min (sm_90 only), CUDA tests ~1-2 min, profile
# ~30 s, GPU suite ~3-4 min. BENCH_CASES (comma-separated substrings, see bench.run --list)
# narrows the suite, e.g. for a second call. Exits non-zero if any stage failed.
set -uo pipefail

OUT=${OUT:-/tmp/twinmerge-device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test profile bench)
deadline=$((SECONDS + ${BUDGET:-560}))
failed=()

stage() {  # stage NAME SECONDS LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS left=$((deadline - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 10 ]; then
    echo "==> $name: skipped, the budget is spent"
    failed+=("$name")
    return
  fi
  echo "==> $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "==> $name: rc $rc in $((SECONDS - start))s"
  tail -n 25 "$log"
  [ $rc -eq 0 ] || failed+=("$name")
}

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for s in "${stages[@]}"; do
  case $s in
    build) stage build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
    test) stage test 240 "$OUT/tests.log" "$PY" -m pytest tests -q -m cuda --maxfail=10 -p no:cacheprovider ;;
    profile) stage profile 90 "$OUT/profile-run.log" "$PY" -m bench.profile --out "$OUT/profile.txt" ;;
    bench) stage bench 600 "$OUT/bench.log" "$PY" -m bench.run --suite gpu --out "$OUT/gpu.json" \
             ${BENCH_CASES:+--cases "$BENCH_CASES"} ;;
    *) echo "unknown stage $s (build test profile bench)"; exit 2 ;;
  esac
done

# The suite's Markdown tables (bench.report), from whatever cases finished.
[ -s "$OUT/gpu.json" ] && "$PY" -m bench.report "$OUT/gpu.json" --out "$OUT/gpu.md" && cat "$OUT/gpu.md"

[ ${#failed[@]} -eq 0 ] || { echo "failed stages: ${failed[*]}"; exit 1; }
