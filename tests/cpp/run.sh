#!/usr/bin/env bash
# Builds the twinmerge C++ library with CMake, installs it into a prefix, then builds the C++
# consumer tests of tests/cpp against that install and runs them with ctest.
#
#   tests/cpp/run.sh                                   # CUDA kernels if torch and nvcc allow it
#   TWINMERGE_WITH_CUDA=OFF tests/cpp/run.sh           # CPU kernels only
#   TWINMERGE_WITH_CUDA=ON CMAKE_CUDA_ARCHITECTURES=90 tests/cpp/run.sh
#
# Environment (all optional):
#   PYTHON                      python with torch and twinmerge_ext (default: python, else
#                               python3); it also makes the AOTInductor package of aoti_serve
#   TWINMERGE_WITH_CUDA         AUTO (default), ON or OFF
#   CMAKE_CUDA_ARCHITECTURES    default "80;90"
#   CUDA_HOME                   CUDA toolkit (default /usr/local/cuda)
#   CMAKE_BUILD_TYPE            default Release
#   TWINMERGE_BUILD_DIR         default build/cmake
#   TWINMERGE_INSTALL_PREFIX    default build/cmake-install (emptied first when it is the default)
#   TWINMERGE_TEST_BUILD_DIR    default build/cmake-tests
#   TWINMERGE_TEST_HEADER_ANCHOR  ON (default): also test the anchor of twinmerge.h on its own
#   TWINMERGE_CMAKE_ARGS        extra arguments for the library's cmake configure (word-split)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: $MAX_JOBS as for setup.py, else ninja's own)
set -euo pipefail
if [[ -z "${CMAKE_BUILD_PARALLEL_LEVEL:-}" && -n "${MAX_JOBS:-}" ]]; then
  export CMAKE_BUILD_PARALLEL_LEVEL="$MAX_JOBS"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
WITH_CUDA="${TWINMERGE_WITH_CUDA:-AUTO}"
BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}"
BUILD_DIR="${TWINMERGE_BUILD_DIR:-$ROOT/build/cmake}"
DEFAULT_PREFIX="$ROOT/build/cmake-install"
PREFIX="${TWINMERGE_INSTALL_PREFIX:-$DEFAULT_PREFIX}"
TEST_BUILD_DIR="${TWINMERGE_TEST_BUILD_DIR:-$ROOT/build/cmake-tests}"
HEADER_ANCHOR="${TWINMERGE_TEST_HEADER_ANCHOR:-ON}"

now() { date +%s.%N; }
T_START="$(now)"
STAGES=()
# stage <name> <command...>: runs the command and records how long it took.
stage() {
  local name="$1" t0 t1 dt
  shift
  echo "==> [$name] $*"
  t0="$(now)"
  "$@"
  t1="$(now)"
  dt="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  STAGES+=("$(printf '%-22s %7ss' "$name" "$dt")")
  echo "==> [$name] done in ${dt}s"
}
report() {
  local rc=$?
  echo "==> timings (TWINMERGE_WITH_CUDA=$WITH_CUDA):"
  local s
  for s in "${STAGES[@]+"${STAGES[@]}"}"; do echo "    $s"; done
  printf '    %-22s %7ss\n' total "$(awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
  [[ $rc -eq 0 ]] && echo "==> OK" || echo "==> FAILED (exit $rc)"
}
trap report EXIT

find_torch() {  # importing torch takes seconds: once
  local out
  out="$("$PYTHON" -c 'import torch; print(torch.__version__); print(torch.utils.cmake_prefix_path)')"
  TORCH_VERSION="$(sed -n 1p <<<"$out")"
  TORCH_CMAKE_PREFIX="$(sed -n 2p <<<"$out")"
  echo "    python $(command -v "$PYTHON"), torch $TORCH_VERSION, CMake prefix $TORCH_CMAKE_PREFIX"
}
stage find-torch find_torch

cuda_args=()
if [[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]]; then
  cuda_args+=("-DCMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES")
fi
if [[ -n "${CUDA_HOME:-}" ]]; then
  cuda_args+=("-DCUDAToolkit_ROOT=$CUDA_HOME")
fi
# shellcheck disable=SC2206  # word-splitting of the extra arguments is intended
extra_args=(${TWINMERGE_CMAKE_ARGS:-})

stage configure cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DCMAKE_PREFIX_PATH="$TORCH_CMAKE_PREFIX" \
  -DTWINMERGE_WITH_CUDA="$WITH_CUDA" \
  "${cuda_args[@]+"${cuda_args[@]}"}" "${extra_args[@]+"${extra_args[@]}"}"
stage build cmake --build "$BUILD_DIR"
if [[ "$PREFIX" == "$DEFAULT_PREFIX" ]]; then
  rm -rf "$PREFIX"  # no stale files from an earlier install
fi
stage install cmake --install "$BUILD_DIR" --prefix "$PREFIX"

stage configure-tests cmake -S "$ROOT/tests/cpp" -B "$TEST_BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_CMAKE_PREFIX" \
  -DTWINMERGE_TEST_HEADER_ANCHOR="$HEADER_ANCHOR" \
  -DTWINMERGE_TEST_PYTHON="$(command -v "$PYTHON")" \
  -UTwinMerge_DIR
stage build-tests cmake --build "$TEST_BUILD_DIR"
stage ctest ctest --test-dir "$TEST_BUILD_DIR" --output-on-failure
