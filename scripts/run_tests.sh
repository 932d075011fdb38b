#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, then
#   1. a warning-free (-Werror) optimised build and every test,
#   2. the same tests under AddressSanitizer + UndefinedBehaviorSanitizer,
#   3. a bounded libFuzzer run of the file loader (when the fuzz target exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
jobs=${HRA_JOBS:-2}

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_WARNINGS_AS_ERRORS=ON \
  -DHRA_BUILD_BENCHMARKS=ON -DHRA_BUILD_EXAMPLES=ON
cmake --build build/release -j "$jobs"
ctest --test-dir build/release -j "$jobs" --output-on-failure

# -Werror is enforced by the build above; under the sanitizers GCC 12 reports false
# -Wmaybe-uninitialized inside std::regex (used by Catch2), so warnings stay warnings here.
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHRA_WARNINGS_AS_ERRORS=OFF \
  -DHRA_SANITIZE=ON -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF
cmake --build build/sanitize -j "$jobs"
ctest --test-dir build/sanitize -j "$jobs" --output-on-failure -E '^consumer:'

if [ -f fuzz/CMakeLists.txt ]; then
  bash scripts/run_fuzz.sh "${HRA_FUZZ_SECONDS:-60}"
fi
