#!/usr/bin/env bash
# The whole Fashion-MNIST fine-tuning comparison from a fresh clone:
#   1. install what is missing (compiler, Eigen, zlib, the data set, matplotlib),
#   2. build the comparison (experiments/, Release, build/release),
#   3. pretrain, fine-tune with every method and write results/ (tables, CSVs),
#   4. draw results/finetune_accuracy_vs_params.png.
# Extra arguments go to the program, e.g. `bash scripts/run_example.sh --epochs 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh python3-matplotlib
jobs=${HRA_JOBS:-2}

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_BUILD_EXAMPLES=ON \
  -DHRA_BUILD_EXPERIMENTS=ON
cmake --build build/release -j "$jobs" --target finetune_fashion_mnist quickstart

out=results
./build/release/experiments/finetune_fashion_mnist --out "$out" "$@"

# The chart is a convenience: a missing or broken matplotlib must not fail the run. The
# system interpreter is tried too, since a virtualenv/pyenv python3 may not see Debian's
# python3-matplotlib.
for py in python3 /usr/bin/python3; do
  if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import matplotlib' 2>/dev/null; then
    "$py" scripts/plot_finetune.py "$out" && exit 0
    break
  fi
done
echo "note: the chart was not drawn (needs python3 with matplotlib); the CSVs in $out/ are complete"
