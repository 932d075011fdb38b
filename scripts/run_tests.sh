#!/usr/bin/env bash
# The whole test suite, as CI runs it (about 10 minutes on 2 cores from a clean checkout):
#   1. install what is missing, then a warning-free (-Werror) optimised build of the tests,
#      examples and benchmarks, and every test (unit, PEFT fixtures, learning, example smoke
#      runs, consumer packages);
#   2. the chain, file-format and data-set tests again under AddressSanitizer + UBSan;
#   3. a bounded libFuzzer run (ASan + UBSan) of the safetensors and PEFT adapter loaders.
#
#   scripts/run_tests.sh                   the above
#   scripts/run_tests.sh --full-sanitize   stage 2 over every test program (about 10 more
#                                          minutes: the sanitizers triple Eigen's compile time)
# Environment: HRA_JOBS (default 2), HRA_FUZZ_SECONDS (default 30, split over the two targets).
set -euo pipefail
cd "$(dirname "$0")/.."

full_sanitize=0
for arg in "$@"; do
  case "$arg" in
    --full-sanitize) full_sanitize=1 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run_tests.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

bash scripts/install_deps.sh
jobs=${HRA_JOBS:-2}
start=$SECONDS
stage() { echo "== run_tests.sh: $* ($((SECONDS - start)) s so far)"; }

stage "1/3 release build (-Werror) and every test"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_WARNINGS_AS_ERRORS=ON \
  -DHRA_BUILD_TESTS=ON -DHRA_BUILD_BENCHMARKS=ON -DHRA_BUILD_EXAMPLES=ON
cmake --build build/release -j "$jobs"
ctest --test-dir build/release -j "$jobs" --output-on-failure

# -Werror is enforced by the build above; under the sanitizers GCC 12 reports false
# -Wmaybe-uninitialized inside std::regex (used by Catch2), so warnings stay warnings here.
# -O1 keeps the instrumented build affordable; the tests check the same results as above.
stage "2/3 AddressSanitizer + UndefinedBehaviorSanitizer"
sanitized=(test_reflector_chain test_peft_fixtures test_safetensors test_fashion_mnist)
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DHRA_WARNINGS_AS_ERRORS=OFF -DHRA_SANITIZE=ON -DHRA_BUILD_TESTS=ON \
  -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF
if [ "$full_sanitize" = 1 ]; then
  cmake --build build/sanitize -j "$jobs"
  ctest --test-dir build/sanitize -j "$jobs" --output-on-failure -E '^consumer:'
else
  cmake --build build/sanitize -j "$jobs" --target "${sanitized[@]}"
  regex=$(IFS='|'; echo "^(${sanitized[*]}):")
  ctest --test-dir build/sanitize -j "$jobs" --output-on-failure -R "$regex"
fi

stage "3/3 fuzzing"
bash scripts/run_fuzz.sh "${HRA_FUZZ_SECONDS:-30}"
stage "done"
