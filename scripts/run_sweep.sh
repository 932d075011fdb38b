#!/usr/bin/env bash
# The Fashion-MNIST data-size sweep (issue #16) from a fresh clone:
#   1. install what is missing (compiler, Eigen, zlib, the data set, matplotlib),
#   2. build the example (Release, build/release),
#   3. run `finetune_fashion_mnist --sweep` into results/ (it reuses results/pretrained_mlp.safetensors
#      when the main job made it with the same settings), its output also in results/sweep_log.txt,
#   4. draw results/sweep_accuracy_vs_size.png and results/sweep_forgetting.png.
# Extra arguments go to the program, e.g. `bash scripts/run_sweep.sh --sweep-steps 400`.
# With HRA_SWEEP_PUBLISH=DIR (e.g. docs/sweep) the tables, CSVs, log and charts are copied there.
# About 14 minutes on 2 shared cores with the defaults (13.5 min measured at load ~5, 254 runs;
# see docs/sweep/sweep_log.txt), plus ~30 s of pretraining when results/ has no cached network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh python3-matplotlib
jobs=${HRA_JOBS:-2}

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DHRA_BUILD_EXAMPLES=ON \
  -DHRA_BUILD_EXPERIMENTS=ON
cmake --build build/release -j "$jobs" --target finetune_fashion_mnist

out=results
mkdir -p "$out"
./build/release/experiments/finetune_fashion_mnist --sweep --out "$out" "$@" | tee "$out/sweep_log.txt"

publish=${HRA_SWEEP_PUBLISH:-}
if [ -n "$publish" ]; then
  mkdir -p "$publish"
  cp "$out"/sweep_summary.csv "$out"/sweep_runs.csv "$out"/sweep_tables.md "$out"/sweep_log.txt \
    "$publish"/
fi

# The charts are a convenience: a missing or broken matplotlib must not fail the run. The
# system interpreter is tried too, since a virtualenv/pyenv python3 may not see Debian's
# python3-matplotlib.
for py in python3 /usr/bin/python3; do
  if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import matplotlib' 2>/dev/null; then
    if "$py" scripts/plot_sweep.py "$out" ${publish:+"$publish"}; then exit 0; fi
    break
  fi
done
echo "note: the charts were not drawn (needs python3 with matplotlib); the CSVs in $out/ are complete"
