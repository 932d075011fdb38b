#!/usr/bin/env bash
# The whole test suite from a clean checkout: install what is missing, then a warning-free
# (-Werror) optimised build of the tests, examples and experiments, and every test (unit, PEFT
# fixtures, learning, example and experiment runs with kills and resumes, consumer packages).
#
#   scripts/run_tests.sh          the above (about 9 minutes on 2 cores, most of it the
#                                 build: the float and double layers compile once
#                                 (tests/support/instances_*.cpp), then 10-120 s of GCC per test)
#   scripts/run_tests.sh --full   what CI runs (.ci/run): also the benchmarks in the -Werror
#                                 build, every test program again under ASan + UBSan, and a
#                                 bounded libFuzzer run, under ASan + UBSan, of the two loaders
#                                 of untrusted bytes (safetensors files and PEFT adapter
#                                 directories), seeded with valid files (1,296 s from a fresh clone, 2026-12-07)
#   scripts/run_tests.sh --fuzz   the default, then the fuzzing run alone (about 5 minutes more)
# Environment: HRA_JOBS (default 2), HRA_FUZZ_SECONDS (default 60; split over the two fuzz
# targets).
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
fuzz=0
for arg in "$@"; do
  case "$arg" in
    --full) full=1; fuzz=1 ;;
    --fuzz) fuzz=1 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run_tests.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

bash scripts/install_deps.sh
jobs=${HRA_JOBS:-2}
start=$SECONDS
stage() { echo "== run_tests.sh: $* ($((SECONDS - start)) s so far)"; }

stage "release build (-Werror) and every test"
# The benchmarks are programs to run on a quiet machine, not tests; --full (CI) compiles them
# too, so that they stay warning-free (scripts/run_benchmarks.sh builds and runs them).
benchmarks=$([ "$full" = 1 ] && echo ON || echo OFF)
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_WARNINGS_AS_ERRORS=ON \
  -DHRA_BUILD_TESTS=ON -DHRA_BUILD_BENCHMARKS="$benchmarks" -DHRA_BUILD_EXAMPLES=ON \
  -DHRA_BUILD_EXPERIMENTS=ON
cmake --build build/release -j "$jobs"
ctest --test-dir build/release -j "$jobs" --output-on-failure

if [ "$full" = 1 ]; then
  # The instrumented build uses clang (Debian's clang 14, installed with the fuzzers' runtime):
  # it compiles hra's tests under ASan in about 60% of GCC 12's time (test_layers.cpp: 51 s
  # and 0.8 GB against 85 s and 1.7 GB), and it is the second compiler that keeps the headers
  # warning-free (-Werror here too). -O1 keeps the instrumented build affordable; the tests
  # check the same results as above.
  stage "every test under AddressSanitizer + UndefinedBehaviorSanitizer (clang)"
  cmake -S . -B build/sanitize -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DHRA_WARNINGS_AS_ERRORS=ON -DHRA_SANITIZE=ON -DHRA_BUILD_TESTS=ON \
    -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF -DHRA_BUILD_EXPERIMENTS=OFF
  cmake --build build/sanitize -j "$jobs"
  ctest --test-dir build/sanitize -j "$jobs" --output-on-failure -E '^consumer:'
fi

if [ "$fuzz" = 1 ]; then
  stage "fuzzing the file loaders (ASan + UBSan)"
  bash scripts/run_fuzz.sh "${HRA_FUZZ_SECONDS:-60}"
fi
stage "done"
