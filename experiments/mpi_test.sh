#!/usr/bin/env bash
# CTest experiment:finetune_mpi: a tiny MLP + CNN comparison on one process, and under mpirun on 2
# ranks with --mpi (each rank a slice of every batch, pretraining included). Both must succeed
# (merged = unmerged), rank 0 alone must print, and every run's accuracy must agree to float
# rounding: at most `tolerance` apart (the sharded batches sum their gradients in another order,
# which moves a few of the 10,000 test predictions at most).
#
#   mpi_test.sh PROGRAM WORKDIR MPIEXEC [MPIEXEC FLAGS...]   (e.g. mpiexec -n 2 --oversubscribe)
set -euo pipefail
program=$1
work=$2
shift 2
mpiexec=("$@")
tolerance=0.005
rm -rf "$work"
mkdir -p "$work"

args=(--train-limit 1000 --pretrain-epochs 1 --epochs 2 --cnn-pretrain-epochs 1 --cnn-epochs 2
      --seeds 1 --methods none,lora,hra,hra-gs --batch 100)

check() {  # check NAME RC
  if grep -q "apt-get install dataset-fashion-mnist" "$work/$1.log"; then
    echo "skipped: the data set is missing"
    exit 0
  fi
  if [ "$2" != 0 ]; then
    echo "FAIL: $1 exited $2; its output:"
    cat "$work/$1.log"
    exit 1
  fi
}

rc=0
HRA_NUM_THREADS=1 "$program" "${args[@]}" --out "$work/one" > "$work/one.log" 2>&1 || rc=$?
check one "$rc"
rc=0
HRA_NUM_THREADS=1 "${mpiexec[@]}" "$program" "${args[@]}" --mpi --out "$work/two" \
  > "$work/two.log" 2>&1 || rc=$?
check two "$rc"

printed=$(grep -c "^threads: .*ranks: 2" "$work/two.log" || true)
if [ "$printed" != 1 ]; then
  echo "FAIL: expected rank 0 alone to print (1 'ranks: 2' line), found $printed"
  exit 1
fi

status=0
for f in finetune_results.csv finetune_cnn_results.csv; do
  awk -F, -v tol="$tolerance" -v file="$f" '
    FNR == 1 { for (i = 1; i <= NF; ++i) col[$i] = i; next }
    NR == FNR { one[$1] = $col["eval_acc"]; next }
    {
      d = $col["eval_acc"] - one[$1]; if (d < 0) d = -d
      if (d > worst) worst = d
      printf "%s %s: 1 process %s, 2 ranks %s, |diff| %.4f\n", file, $1, one[$1], $col["eval_acc"], d
      if (!($1 in one) || d > tol) bad = 1
    }
    END { printf "%s: max |accuracy difference| %.4f (tolerance %s)\n", file, worst, tol; exit bad }
  ' "$work/one/$f" "$work/two/$f" || status=1
done
grep -h "throughput" "$work/one.log" "$work/two.log" || true
[ "$status" = 0 ] && echo "mpi test: 2 ranks agree with 1 process"
exit "$status"
