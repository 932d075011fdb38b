#!/usr/bin/env bash
# Issue #11's stall check: the main job's LoRA and HRA runs, repeated while a CPU-bound process
# holds one core, and their training times per run as the job reports them.
#
#   scripts/run_stall_check.sh [RUNS] [-- extra finetune_fashion_mnist flags]
#
# Runs build/release/experiments/finetune_fashion_mnist --methods lora,hra --seeds 1 --arch mlp
# RUNS times (default 5) after one warm-up that also caches the pretrained network, with
# `while :; do :; done` beside it (HRA_STALL_BUSY=0: without it), and prints per method the
# training seconds of every run (finetune_results.csv, column train_seconds), the median, the maximum
# and max / median (#11: at most 1.3), then the accuracy and the hash of the test logits, which
# must not change from run to run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
exe=build/release/experiments/finetune_fashion_mnist
[ -x "$exe" ] || { echo "run_stall_check.sh: build $exe first (scripts/run_tests.sh)" >&2; exit 2; }
out=$(mktemp -d /tmp/hra-stall.XXXXXX)
busy=""
cleanup() {
  [ -n "$busy" ] && kill "$busy" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT
if [ "${HRA_STALL_BUSY:-1}" = 1 ]; then
  bash -c 'while :; do :; done' &
  busy=$!
fi
for i in $(seq 0 "$runs"); do
  "$exe" --methods lora,hra --seeds 1 --arch mlp --out "$out/run" "$@" >"$out/log_$i.txt"
  [ "$i" = 0 ] && continue  # the warm-up
  cp "$out/run/finetune_results.csv" "$out/results_$i.csv"
done
python3 - "$out" "$runs" <<'EOF'
import csv, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
times, accs = {}, {}
for i in range(1, runs + 1):
    with open(f"{out}/results_{i}.csv") as f:
        for row in csv.DictReader(f):
            times.setdefault(row["method"], []).append(float(row["train_seconds"]))
            accs.setdefault(row["method"], set()).add((row["eval_acc"], row["logits_fnv1a"]))
for m, t in times.items():
    med = statistics.median(t)
    print(f"{m}: runs {', '.join(f'{v:.2f}' for v in t)} s; median {med:.2f}, max {max(t):.2f}, "
          f"max/median {max(t) / med:.3f}; (accuracy, logits hash) over the runs: {sorted(accs[m])}")
EOF
