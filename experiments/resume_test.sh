#!/usr/bin/env bash
# CTest experiment:finetune_resume: a short comparison (MLP and CNN, pretraining included) run once
# without interruption, then three times more, each time interrupted and resumed from its
# checkpoint until it finishes:
#   stops:    stopped three times (--stop-after-steps: mid-pretraining, at the last step of an
#             epoch, in the CNN; --checkpoint-every 3), the legs with other thread counts;
#   saves:    killed with SIGKILL right after every save the run makes (--kill-after-save 1: each
#             leg dies after its first save; --checkpoint-every 0), checkpoints and pretrained
#             files alike;
#   random:   killed with SIGKILL at pseudo-random moments (fixed seed; --checkpoint-every 2).
# Every results, summary and curves file (timing columns left out), the logits' FNV-1a hashes in
# them, and the pretrained weights must be equal byte for byte to the uninterrupted run's, and no
# temporary file may be left in the checkpoint directory.
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

# The CSVs without the columns that measure time.
untimed() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; ++i) drop[i] = ($i ~ /seconds|elapsed/) }
           { line = ""; for (i = 1; i <= NF; ++i) if (!drop[i]) line = line $i ","; print line }' "$1"
}
status=0
compare() {  # compare CHAIN: its outputs against the uninterrupted run's
  local chain=$1 f bad=0
  for f in finetune_results.csv finetune_summary.csv finetune_curves.csv finetune_cnn_results.csv \
           finetune_cnn_summary.csv finetune_cnn_curves.csv; do
    if ! cmp -s <(untimed "$work/whole/$f") <(untimed "$work/$chain/$f"); then
      echo "DIFFERENT ($chain): $f"
      diff <(untimed "$work/whole/$f") <(untimed "$work/$chain/$f") | head -20 || true
      bad=1
    fi
  done
  for f in pretrained_mlp.safetensors pretrained_cnn.safetensors; do
    if ! cmp -s "$work/whole/$f" "$work/$chain/$f"; then
      echo "DIFFERENT ($chain): $f"
      bad=1
    fi
  done
  local temps
  temps=$(find "$work/$chain/checkpoint" -name '*.tmp*' | wc -l)
  if [ "$temps" != 0 ]; then
    echo "LEFT BEHIND ($chain): $temps temporary file(s) in the checkpoint directory"
    bad=1
  fi
  # A kill while the pretrained file is written leaves its temporary file beside it (single files
  # are replaced atomically, but nothing removes another process's temporary file): counted only.
  temps=$(find "$work/$chain" -maxdepth 1 -name '.*.tmp.*' | wc -l)
  if [ "$bad" = 0 ]; then
    echo "$chain: equal to the uninterrupted run (6 CSVs, 2 pretrained files);" \
      "$temps temporary file(s) beside the pretrained files"
  else
    status=1
  fi
}

HRA_NUM_THREADS=2 run whole 0 --out "$work/whole"

# Stops.
ckpt=(--out "$work/stops" --checkpoint "$work/stops/checkpoint" --checkpoint-every 3)
HRA_NUM_THREADS=1 run leg1 75 "${ckpt[@]}" --stop-after-steps 5
HRA_NUM_THREADS=1 run leg2 75 "${ckpt[@]}" --resume --stop-after-steps 25
HRA_NUM_THREADS=2 run leg3 75 "${ckpt[@]}" --resume --stop-after-steps 40
HRA_NUM_THREADS=1 run leg4 0 "${ckpt[@]}" --resume
grep -h "resumed at" "$work"/leg*.log
compare stops

# A chain of legs, each resuming the last one's checkpoint, until one exits 0 (at most 60).
# Every other leg runs on 2 threads. A leg killed by SIGKILL exits 137.
stalled=0  # legs in a row that saved nothing (see random_delay)
chain() {  # chain NAME DELAY_FUNCTION ARGS...: DELAY_FUNCTION (or "") sets $delay, a leg's limit
  local name=$1 delay_of=$2
  shift 2
  local legs=0 kills=0 rc=137 resume=() killer before widest=0
  stalled=0
  while [ "$rc" != 0 ]; do
    legs=$((legs + 1))
    if [ "$legs" -gt 60 ]; then
      echo "FAIL: $name did not finish in 60 legs"
      exit 1
    fi
    # The delay is drawn here, not in a subshell: bash reseeds RANDOM in every subshell.
    killer=""
    if [ -n "$delay_of" ]; then
      "$delay_of"
      killer="timeout -s KILL $delay"
    fi
    before=$(saved_state "$work/$name")
    rc=0
    # (In a subshell whose stderr is dropped: it reports the kill there. The exit keeps it from
    # replacing itself by the program.)
    (HRA_NUM_THREADS=$((1 + legs % 2)) $killer "$program" "${args[@]}" --out "$work/$name" \
      --checkpoint "$work/$name/checkpoint" "${resume[@]}" "$@" > "$work/$name-leg$legs.log" \
      2>&1; exit $?) 2> /dev/null || rc=$?
    if [ "$(saved_state "$work/$name")" = "$before" ]; then
      stalled=$((stalled + 1))
      [ "$stalled" -gt "$widest" ] && widest=$stalled
    else
      stalled=0
    fi
    if [ "$rc" = 137 ]; then
      kills=$((kills + 1))
      sed -n "s/^--kill-after-save: SIGKILL after save 1/  leg $legs killed after its first save/p" \
        "$work/$name-leg$legs.log"
    elif [ "$rc" != 0 ]; then
      echo "FAIL: $name leg $legs exited $rc; its output:"
      cat "$work/$name-leg$legs.log"
      exit 1
    fi
    resume=(--resume)
  done
  echo "$name: $kills SIGKILLs, $legs legs; at most $widest leg(s) in a row saved nothing"
}

# What the saves of a run have written so far: every file under DIR with its time and size.
saved_state() {
  { find "$1" -type f -printf '%T@ %s %p\n' 2> /dev/null || true; } | sort | cksum
}

# Saves: a kill after each save, in the order the run makes them.
chain saves "" --checkpoint-every 0 --kill-after-save 1
compare saves

# Random moments: delays in [0.1, 2.0) s from a fixed seed, so that every run of the test kills
# at the same moments of wall-clock time (which points of the program they hit depends on the
# machine). A stretch between two saves can take longer than 2 s on a slow or busy machine (the
# CNN's last evaluations plus the start-up took 2.2 s here on 2026-12-04), so every leg in a row
# that saved nothing widens the range by 1 s: the chain always finishes, still at random moments.
RANDOM=12
random_delay() {
  local centis=$((10 + RANDOM % (190 + 100 * stalled)))
  delay=$(printf '%d.%02d' $((centis / 100)) $((centis % 100)))
}
chain random random_delay --checkpoint-every 2
compare random

echo "logits hashes (uninterrupted; stops, saves, random):"
paste -d' ' <(untimed "$work/whole/finetune_results.csv" | cut -d, -f1,16) \
  <(untimed "$work/stops/finetune_results.csv" | cut -d, -f16) \
  <(untimed "$work/saves/finetune_results.csv" | cut -d, -f16) \
  <(untimed "$work/random/finetune_results.csv" | cut -d, -f16)
[ "$status" = 0 ] && echo "resume test: bit-for-bit equal"
exit "$status"
