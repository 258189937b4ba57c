#!/usr/bin/env bash
# FORTRESS vs FedAvg on amazon-cell-phones: the README's table (8 rows x 3 seeds, same rounds for all).
# Resumable: a run whose results.json exists is skipped.
#   experiments/fortress_grid.sh [OUT_ROOT=runs/fortress] [ROUNDS=300]
#   python experiments/fortress_table.py runs/fortress      # mean +- std table
# FORTRESS_CMD overrides the command (default: fortress). threads=1: the runs share a 2-core machine.
set -euo pipefail
OUT=${1:-runs/fortress}
ROUNDS=${2:-300}
read -r -a CMD <<< "${FORTRESS_CMD:-fortress}"

run() {
  local name=$1 seed=$2
  shift 2
  local dir=$OUT/$name/s$seed
  [ -f "$dir/results.json" ] && return 0
  echo "$(date +%T) $name seed $seed" >&2
  mkdir -p "$OUT/$name"
  if ! "${CMD[@]}" run --data amazon-cell-phones --out "$dir" --set rounds="$ROUNDS" --set eval_every=100 \
      --set seed="$seed" --set threads=1 --quiet "$@" > "$dir.log" 2>&1; then
    cat "$dir.log" >&2
    exit 1
  fi
}

for seed in 0 1 2; do
  run fedavg-sasrec "$seed" --set mode=fedavg
  run fortress-sasrec "$seed" --set mode=fortress
done
for seed in 0 1 2; do
  run fedavg-gru4rec "$seed" --set mode=fedavg --set backbone=gru4rec
  run fortress-gru4rec "$seed" --set mode=fortress --set backbone=gru4rec
done
for seed in 0 1 2; do
  for off in seq_view user_view item_view temporal; do
    run "fortress-sasrec-no-$off" "$seed" --set mode=fortress --set "$off=false"
  done
done
echo "$(date +%T) grid done" >&2
