#!/usr/bin/env bash
# A bounded libFuzzer run of the safetensors reader:  scripts/run_fuzz.sh [SECONDS]   (default 60)
# Builds fuzz/ with clang in build/fuzz, seeds build/fuzz/corpus with a few valid files (the
# corpus is kept between runs), fuzzes for SECONDS, prints the number of executions and exits
# non-zero if libFuzzer found a crash, a sanitizer error, a leak, a timeout or an OOM; the
# reproducer is then in build/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${HRA_JOBS:-2}
build=build/fuzz

CXX=clang++ cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DHRA_BUILD_FUZZERS=ON -DHRA_BUILD_TESTS=OFF -DHRA_BUILD_BENCHMARKS=OFF \
  -DHRA_BUILD_EXAMPLES=OFF -DHRA_USE_OPENMP=OFF -DHRA_INSTALL=OFF
cmake --build "$build" -j "$jobs" --target fuzz_safetensors fuzz_safetensors_seeds

corpus=$build/corpus
artifacts=$build/artifacts
mkdir -p "$corpus" "$artifacts"
"$build/fuzz/fuzz_safetensors_seeds" "$corpus"
# Tokens of the header grammar help the fuzzer build plausible headers quickly.
cat > "$build/safetensors.dict" <<'DICT'
"{"
"}"
"["
"]"
":"
","
"\"dtype\""
"\"shape\""
"\"data_offsets\""
"\"__metadata__\""
"\"F16\""
"\"BF16\""
"\"F32\""
"\"F64\""
"\"I32\""
"18446744073709551615"
"9223372036854775807"
"-1"
"1.5"
DICT

log=$build/fuzz_safetensors.log
status=0
"$build/fuzz/fuzz_safetensors" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
  -print_final_stats=1 -dict="$build/safetensors.dict" -artifact_prefix="$artifacts/" \
  "$corpus" >"$log" 2>&1 || status=$?

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
echo "fuzz_safetensors: ${execs:-unknown} executions in ${seconds} s, corpus $(ls "$corpus" | wc -l) files, exit status $status (log: $log)"
if [ "$status" -ne 0 ]; then
  echo "fuzz_safetensors FAILED; last lines of the log:" >&2
  tail -n 60 "$log" >&2
  exit "$status"
fi
