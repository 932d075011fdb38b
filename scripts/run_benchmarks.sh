#!/usr/bin/env bash
# Builds and runs the hra benchmarks and the PyTorch reference, then rewrites the generated
# tables of BENCHMARKS.md and its chart (scripts/bench_report.py; the prose is written by hand).
#
#   scripts/run_benchmarks.sh            full report: about 45 minutes on 2 cores (measured
#                                        2026-11-27, before the prototypes were retired): five
#                                        builds, the full C++ sweep (8 min), the headline subset
#                                        in four more builds, PyTorch (13 min)
#   scripts/run_benchmarks.sh --quick    CI smoke run: headline shape + one small case (~2 min
#                                        after the build), primary build only
# Options:
#   --threads N      threads for Eigen/OpenBLAS/PyTorch (default 2, the headline)
#   --out DIR        where the JSON results go (default bench/results)
#   --no-build       reuse the existing build directories
#   --no-torch       skip the PyTorch reference (its columns are then empty)
#   --report-only    only rerun scripts/bench_report.py on existing results
#
# Builds (Release: -O3 -DNDEBUG), one directory each:
#   build/bench-default       what a plain configure gives: -march=native, Eigen's own kernels,
#                             no OpenMP; hra's pool splits the large products  <- primary, full sweep
#   build/bench-blas_serial   the same with Eigen's products on OpenBLAS (EIGEN_USE_BLAS),
#                             OpenBLAS threads                         <- headline subset
#   build/bench-blas_omp      OpenBLAS + Eigen's OpenMP splitting the products
#                             (2 Eigen threads x 1 OpenBLAS thread)
#   build/bench-eigen_omp     Eigen's own kernels on 2 OpenMP threads (the old default)
#   build/bench-portable      HRA_PORTABLE=ON with OpenMP (SSE2 kernels only: the build before #11)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 threads=2 out=bench/results build=1 torch=1 report_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --threads) threads="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    --no-torch) torch=0 ;;
    --report-only) report_only=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "run_benchmarks.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

# What the builds, the PyTorch reference and the chart need (Debian packages; see install_deps.sh).
deps=(python3-matplotlib)
[ "$report_only" = 0 ] && deps+=(libopenblas-dev)
[ "$report_only" = 0 ] && [ "$torch" = 1 ] && deps+=(python3-torch)
bash scripts/install_deps.sh "${deps[@]}"

PY=/usr/bin/python3  # Debian's python3-torch and python3-matplotlib live here
[ -x "$PY" ] || PY=python3
jobs=${HRA_JOBS:-2}
mkdir -p "$out"

# name | cmake options | hra_bench arguments
configs=(
  "default||--threads=$threads"
  "blas_serial|-DHRA_USE_BLAS=ON|--threads=1 --blas-threads=$threads"
  "blas_omp|-DHRA_USE_BLAS=ON -DHRA_USE_OPENMP=ON|--threads=$threads --blas-threads=1"
  "eigen_omp|-DHRA_USE_OPENMP=ON|--threads=$threads"
  "portable|-DHRA_PORTABLE=ON -DHRA_USE_OPENMP=ON|--threads=$threads"
)
primary=default
[ "$quick" = 1 ] && configs=("${configs[0]}")

# Case filters (see bench/bench_hra.cpp for the naming scheme).
headline='^[a-z_]+/[a-z]+/float/d_in:4096/d_out:4096/r:(0|8|32)/n:(0|512)/'
small='^[a-z_]+/[a-z]+/float/d_in:256/d_out:256/r:(0|8)/n:(0|64)/'
cells='^(frozen|lora|hra)/fwdbwd/float/d_in:[0-9]+/d_out:[0-9]+/r:(0|2|8|32)/n:(64|512)/'
if [ "$quick" = 1 ]; then
  primary_filter="^[a-z_]+/[a-z]+/float/d_in:4096/d_out:4096/r:(0|8)/n:(0|512)/|$small"
  primary_args=(--reps=3 --no-double)
else
  primary_filter='.'
  primary_args=()
fi

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

if [ "$report_only" = 0 ]; then
  : >"$out/loadavg.txt"
  for entry in "${configs[@]}"; do
    IFS='|' read -r name cmake_opts bench_args <<<"$entry"
    dir=build/bench-$name
    if [ "$build" = 1 ]; then
      # shellcheck disable=SC2086
      cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DHRA_WARNINGS_AS_ERRORS=ON \
        -DHRA_BUILD_TESTS=OFF -DHRA_BUILD_EXAMPLES=OFF -DHRA_BUILD_EXPERIMENTS=OFF \
        -DHRA_BUILD_FUZZERS=OFF -DHRA_INSTALL=OFF -DHRA_BUILD_BENCHMARKS=ON $cmake_opts >/dev/null
      cmake --build "$dir" --target hra_bench -j "$jobs"
    fi
    if [ "$name" = "$primary" ]; then
      filter=$primary_filter
      extra=("${primary_args[@]+"${primary_args[@]}"}")
    else
      filter=$headline
      extra=(--no-double)
    fi
    echo "== $name: $(loadavg) (load before)"
    echo "$name before $(loadavg)" >>"$out/loadavg.txt"
    # Random interleaving spreads the repetitions of the headline cases over the whole run, so a
    # burst of load from elsewhere hits every method alike.
    # shellcheck disable=SC2086
    HRA_NUM_THREADS=$threads OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
      "$dir/bench/hra_bench" $bench_args "${extra[@]+"${extra[@]}"}" \
      --benchmark_filter="$filter" --benchmark_min_time=0.2 \
      --benchmark_enable_random_interleaving=true \
      --benchmark_out="$out/cpp_$name.json" --benchmark_out_format=json
    if [ "$name" = "$primary" ] && [ "$quick" = 0 ]; then
      # Issue #11's 24 cells again (HRA, LoRA and frozen fwd+bwd at r in {2, 8, 32}, n in
      # {64, 512}, every layer), as medians of 5 interleaved repetitions: the sweep above
      # times most of them once.
      # shellcheck disable=SC2086
      HRA_NUM_THREADS=$threads OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
        "$dir/bench/hra_bench" $bench_args --no-double --no-check \
        --benchmark_filter="$cells" --benchmark_min_time=0.2 \
        --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
        --benchmark_enable_random_interleaving=true \
        --benchmark_out="$out/cells_$name.json" --benchmark_out_format=json
      # HraLinear's chain and low-rank forms where its cost model switches (4096 -> 1024, r = 8,
      # n = 512 and 2048; BENCHMARKS.md quotes it by hand).
      # shellcheck disable=SC2086
      HRA_NUM_THREADS=$threads OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
        "$dir/bench/hra_bench" $bench_args --forms --no-check --benchmark_min_time=0.2 \
        --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
        --benchmark_enable_random_interleaving=true \
        --benchmark_out="$out/forms_$name.json" --benchmark_out_format=json
    fi
    echo "$name after $(loadavg)" >>"$out/loadavg.txt"
  done

  if [ "$torch" = 1 ]; then
    echo "== PyTorch reference: $(loadavg) (load before)"
    echo "torch before $(loadavg)" >>"$out/loadavg.txt"
    if [ "$quick" = 1 ]; then
      torch_args=(--quick --ranks 8 --methods frozen,lora,peft_hra --min-time 0.2 --min-iters 1)
    else
      # n = 512 for every layer and rank; PEFT's cost does not depend on n. A case whose
      # warm-up plus 3 iterations would exceed 100 s is skipped (r = 128 at d = 4096).
      torch_args=(--batches 512 --ranks 2,8,32,128 --min-time 0.5 --min-iters 3
        --max-seconds-per-case 100)
    fi
    "$PY" bench/torch_reference.py --threads "$threads" "${torch_args[@]}" \
      --json "$out/torch.json"
    echo "torch after $(loadavg)" >>"$out/loadavg.txt"
  fi
fi

"$PY" scripts/bench_report.py --results "$out" --primary "$primary" --output BENCHMARKS.md \
  --chart bench/overhead_vs_d.png
