#!/usr/bin/env bash
# Bounded libFuzzer runs of the file readers:  scripts/run_fuzz.sh [SECONDS]   (default 60)
# Builds fuzz/ with clang in build/fuzz and runs, one after the other, each for half of SECONDS:
#   fuzz_safetensors     the safetensors reader (corpus build/fuzz/corpus)
#   fuzz_adapter_config  the PEFT adapter loader: adapter_config.json + adapter_model.safetensors
#                        bytes into HRA / LoRA layers (corpus build/fuzz/corpus_adapter)
# Each corpus is seeded with valid inputs and kept between runs. Prints the number of executions
# of each target and exits non-zero if libFuzzer found a crash, a sanitizer error, a leak, a
# timeout or an OOM in either; the reproducer is then in build/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${HRA_JOBS:-2}
build=build/fuzz

CXX=clang++ cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DHRA_BUILD_FUZZERS=ON -DHRA_BUILD_TESTS=OFF -DHRA_BUILD_BENCHMARKS=OFF \
  -DHRA_BUILD_EXAMPLES=OFF -DHRA_BUILD_EXPERIMENTS=OFF -DHRA_USE_OPENMP=OFF -DHRA_INSTALL=OFF
# The default target is exactly the four fuzz programs; naming them with --target would make
# the Makefile generator build them one after the other instead of in parallel.
cmake --build "$build" -j "$jobs"

artifacts=$build/artifacts
mkdir -p "$artifacts"
first=$(( (seconds + 1) / 2 ))
second=$(( seconds - first ))
[ "$second" -ge 1 ] || second=1

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

# The adapter inputs add the config's fields and values.
cp "$build/safetensors.dict" "$build/adapter.dict"
cat >> "$build/adapter.dict" <<'DICT'
"\"peft_type\""
"\"HRA\""
"\"LORA\""
"\"r\""
"\"apply_GS\""
"\"init_weights\""
"\"bias\""
"\"none\""
"\"all\""
"\"hra_only\""
"\"lora_only\""
"\"lora_alpha\""
"\"lora_dropout\""
"\"use_rslora\""
"\"fan_in_fan_out\""
"\"use_dora\""
"\"lora_bias\""
"\"rank_pattern\""
"\"alpha_pattern\""
"\"target_modules\""
"\"net.fc1\""
"\"net\\\\.fc2\""
"\"fc2\""
"\"base_model.model.net.fc1.hra_u\""
"\"base_model.model.net.fc2.lora_A.weight\""
"\"base_model.model.net.fc2.lora_B.weight\""
"\"base_model.model.net.fc1.base_layer.bias\""
"true"
"false"
"null"
"2147483647"
"0"
"1e308"
DICT

status=0
summary=()
fuzz() {  # fuzz TARGET SEED_WRITER CORPUS DICT SECONDS
  local target=$1 seeds=$2 corpus=$3 dict=$4 time=$5
  local log=$build/$target.log rc=0
  mkdir -p "$corpus"
  "$build/fuzz/$seeds" "$corpus"
  "$build/fuzz/$target" -max_total_time="$time" -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 -dict="$dict" -artifact_prefix="$artifacts/" \
    "$corpus" >"$log" 2>&1 || rc=$?
  local execs
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  summary+=("$target: ${execs:-unknown} executions in ${time} s, corpus $(ls "$corpus" | wc -l) files, exit status $rc (log: $log)")
  echo "${summary[-1]}"
  if [ "$rc" -ne 0 ]; then
    echo "$target FAILED; last lines of the log:" >&2
    tail -n 60 "$log" >&2
    status=$rc
  fi
}

fuzz fuzz_safetensors fuzz_safetensors_seeds "$build/corpus" "$build/safetensors.dict" "$first"
fuzz fuzz_adapter_config fuzz_adapter_config_seeds "$build/corpus_adapter" "$build/adapter.dict" \
  "$second"

echo "fuzz summary (${seconds} s in total):"
printf '  %s\n' "${summary[@]}"
exit "$status"
