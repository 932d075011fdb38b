#!/usr/bin/env bash
# CTest example:finetune_resume: a short comparison (MLP and CNN, pretraining included) run once
# without interruption, and once stopped three times (--stop-after-steps: mid-pretraining, at the
# last step of an epoch, in the CNN) and resumed from its checkpoint (--checkpoint-every 3), the
# resumed legs with another thread count. Every results, summary and curves file (timing columns
# left out), the logits' FNV-1a hashes in them, and the pretrained weights must be equal byte for
# byte.
#
#   resume_test.sh PROGRAM WORKDIR
set -euo pipefail
program=$1
work=$2
rm -rf "$work"
mkdir -p "$work"

args=(--train-limit 1000 --pretrain-epochs 1 --epochs 2 --cnn-pretrain-epochs 1 --cnn-epochs 2
      --seeds 1 --methods none,lora,hra-gs --batch 100)

run() {  # run NAME EXPECTED_EXIT ARGS...
  local name=$1 expected=$2
  shift 2
  local rc=0
  "$program" "${args[@]}" "$@" > "$work/$name.log" 2>&1 || rc=$?
  if grep -q "apt-get install dataset-fashion-mnist" "$work/$name.log"; then
    echo "skipped: the data set is missing"
    cat "$work/$name.log"
    exit 0
  fi
  if [ "$rc" != "$expected" ]; then
    echo "FAIL: $name exited $rc, expected $expected; its output:"
    cat "$work/$name.log"
    exit 1
  fi
  echo "$name: exit $rc"
}

HRA_NUM_THREADS=2 run whole 0 --out "$work/whole"
ckpt=(--out "$work/resumed" --checkpoint "$work/resumed/checkpoint" --checkpoint-every 3)
HRA_NUM_THREADS=1 run leg1 75 "${ckpt[@]}" --stop-after-steps 5
HRA_NUM_THREADS=1 run leg2 75 "${ckpt[@]}" --resume --stop-after-steps 25
HRA_NUM_THREADS=2 run leg3 75 "${ckpt[@]}" --resume --stop-after-steps 40
HRA_NUM_THREADS=1 run leg4 0 "${ckpt[@]}" --resume
grep -h "resumed at" "$work"/leg*.log

# The CSVs without the columns that measure time.
untimed() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; ++i) drop[i] = ($i ~ /seconds|elapsed/) }
           { line = ""; for (i = 1; i <= NF; ++i) if (!drop[i]) line = line $i ","; print line }' "$1"
}
status=0
for f in finetune_results.csv finetune_summary.csv finetune_curves.csv finetune_cnn_results.csv \
         finetune_cnn_summary.csv finetune_cnn_curves.csv; do
  if cmp -s <(untimed "$work/whole/$f") <(untimed "$work/resumed/$f"); then
    echo "equal: $f ($(wc -l < "$work/whole/$f") lines)"
  else
    echo "DIFFERENT: $f"
    diff <(untimed "$work/whole/$f") <(untimed "$work/resumed/$f") | head -20
    status=1
  fi
done
for f in pretrained_mlp.safetensors pretrained_cnn.safetensors; do
  if cmp -s "$work/whole/$f" "$work/resumed/$f"; then
    echo "equal: $f"
  else
    echo "DIFFERENT: $f"
    status=1
  fi
done
echo "logits hashes (uninterrupted, resumed):"
paste -d' ' <(untimed "$work/whole/finetune_results.csv" | cut -d, -f1,16) \
  <(untimed "$work/resumed/finetune_results.csv" | cut -d, -f16)
[ "$status" = 0 ] && echo "resume test: bit-for-bit equal"
exit "$status"
