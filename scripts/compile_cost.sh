#!/usr/bin/env bash
# What one user translation unit costs to compile: CPU seconds (user + sys) and peak memory
# (maximum resident set size) of g++ for each file in scripts/compile_cost/, as /usr/bin/time
# reports them. The files are what a user writes: the core header alone, one HraLinearf trained a
# step (plainly, and through include/hra/extern_templates.hpp, whose instantiations one other
# file of the program compiles: instances.cpp, timed too), one HraConv2df, a PEFT save, and an
# MPI DataParallel step.
#
#   scripts/compile_cost.sh [-n RUNS] [CXXFLAGS...]
#
# Flags default to what the README tells users: -std=c++17 -O2 -march=native -DNDEBUG. With -n,
# every file is compiled RUNS times and the median is printed. Each compile runs alone (the
# machine's other core stays idle only if nothing else runs). Exit status 0; a file that does not
# compile stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=1
if [ "${1:-}" = "-n" ]; then
  runs=$2
  shift 2
fi
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(-std=c++17 -O2 -march=native -DNDEBUG)
cxx=${CXX:-g++}
eigen=$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# median of the arguments (numbers)
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

measure() {  # name, then the compile command's extra arguments
  local name=$1
  shift
  local cpus=() rss=()
  for ((i = 0; i < runs; i++)); do
    /usr/bin/time -f '%U %S %M' -o "$out/time" "$cxx" "${flags[@]}" -Iinclude $eigen "$@" \
      -c -o "$out/o.o"
    read -r user sys kb <"$out/time"
    cpus+=("$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.1f", u + s}')")
    rss+=("$((kb / 1024))")
  done
  printf '| %-44s | %8s | %8s |\n' "$name" "$(median "${cpus[@]}")" "$(median "${rss[@]}")"
}

echo "compiler: $($cxx --version | head -1); flags: ${flags[*]}; runs: $runs (median)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')," \
  "$(grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo 'no AVX-512')"
printf '| %-44s | %8s | %8s |\n' "translation unit" "CPU s" "peak MB"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "---------:" "---------:"
c=scripts/compile_cost
measure "include <hra/hra.hpp> only" $c/include_only.cpp
measure "one HraLinearf: forward, backward, step" $c/hra_linear.cpp
measure "the same through extern_templates.hpp" -include include/hra/extern_templates.hpp \
  $c/hra_linear.cpp
measure "extern_templates' instances (once a program)" $c/instances.cpp
measure "one HraConv2df: forward, backward" $c/hra_conv.cpp
if pkg-config --exists nlohmann_json 2>/dev/null || [ -f /usr/include/nlohmann/json.hpp ]; then
  measure "<hra/io.hpp> + save_hra_adapters" $c/io_save.cpp
fi
mpi_flags=$(mpicxx --showme:compile 2>/dev/null || true)
if [ -n "$mpi_flags" ]; then
  # shellcheck disable=SC2086
  measure "MPI DataParallel step" $mpi_flags $c/mpi_data_parallel.cpp
fi
