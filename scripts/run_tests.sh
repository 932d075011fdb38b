#!/usr/bin/env bash
# The whole test suite, as CI runs it (about 10 minutes on 2 cores from a clean checkout):
#   1. install what is missing, then a warning-free (-Werror) optimised build of the tests,
#      examples and benchmarks, and every test (unit, PEFT fixtures, learning, example smoke
#      runs, consumer packages);
#   2. a bounded libFuzzer run, under AddressSanitizer + UBSan, of the two loaders of untrusted
#      bytes (safetensors files and PEFT adapter directories), seeded with valid files.
#
#   scripts/run_tests.sh          the above
#   scripts/run_tests.sh --full   also every test program under ASan + UBSan, and 60 s of
#                                 fuzzing (about 25 minutes: the sanitizers make Eigen-heavy
#                                 files 3-4x slower to compile)
# Environment: HRA_JOBS (default 2), HRA_FUZZ_SECONDS (default 30, or 60 with --full; split
# over the two fuzz targets).
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
for arg in "$@"; do
  case "$arg" in
    --full) full=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run_tests.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

bash scripts/install_deps.sh
jobs=${HRA_JOBS:-2}
start=$SECONDS
stage() { echo "== run_tests.sh: $* ($((SECONDS - start)) s so far)"; }

stage "release build (-Werror) and every test"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_WARNINGS_AS_ERRORS=ON \
  -DHRA_BUILD_TESTS=ON -DHRA_BUILD_BENCHMARKS=ON -DHRA_BUILD_EXAMPLES=ON
cmake --build build/release -j "$jobs"
ctest --test-dir build/release -j "$jobs" --output-on-failure

if [ "$full" = 1 ]; then
  # -Werror is enforced by the build above; under the sanitizers GCC 12 reports false
  # -Wmaybe-uninitialized inside std::regex (used by Catch2), so warnings stay warnings here.
  # -O1 keeps the instrumented build affordable; the tests check the same results as above.
  stage "every test under AddressSanitizer + UndefinedBehaviorSanitizer"
  cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DHRA_WARNINGS_AS_ERRORS=OFF -DHRA_SANITIZE=ON -DHRA_BUILD_TESTS=ON \
    -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF
  cmake --build build/sanitize -j "$jobs"
  ctest --test-dir build/sanitize -j "$jobs" --output-on-failure -E '^consumer:'
fi

stage "fuzzing the file loaders (ASan + UBSan)"
bash scripts/run_fuzz.sh "${HRA_FUZZ_SECONDS:-$((full ? 60 : 30))}"
stage "done"
