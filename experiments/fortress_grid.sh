#!/usr/bin/env bash
# FORTRESS vs FedAvg (default on amazon-cell-phones): the table in docs/results/client-objective.md (8 rows x seeds, same rounds for all).
#   experiments/fortress_grid.sh [OUT_ROOT=runs/fortress] [ROUNDS=1500]
#   python experiments/fortress_table.py runs/fortress      # mean +- std table
# Environment:
#   SEEDS="0 1 2"          seeds (each row runs once per seed)
#   DATA=amazon-cell-phones  the data (as `fortress run --data`)
#   ROWS="..."             only these rows (names as below; default all 8)
#   INIT_SASREC=RUN_DIR    warm start: every SASRec row (FedAvg included) starts from that saved run's
#   INIT_GRU4REC=RUN_DIR   model (init_from) and trains ROUNDS more rounds; GRU4Rec rows likewise
#   FORTRESS_CMD           the command (default: fortress), e.g. ".venv/bin/fortress"
#   JOBS=1                 runs at a time (threads=1 each)
# Resumable: a run whose results.json exists is skipped; a run cut off resumes from its checkpoint.
set -euo pipefail
OUT=${1:-runs/fortress}
ROUNDS=${2:-1500}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-1}
DATA=${DATA:-amazon-cell-phones}
read -r -a CMD <<< "${FORTRESS_CMD:-fortress}"

ALL_ROWS=(fedavg-sasrec fortress-sasrec fedavg-gru4rec fortress-gru4rec fortress-sasrec-no-seq_view
          fortress-sasrec-no-user_view fortress-sasrec-no-item_view fortress-sasrec-no-temporal)
read -r -a ROWS <<< "${ROWS:-${ALL_ROWS[*]}}"

row_args() {      # the config of a row
  case $1 in
    fedavg-sasrec) echo "--set mode=fedavg" ;;
    fortress-sasrec) echo "--set mode=fortress" ;;
    fedavg-gru4rec) echo "--set mode=fedavg --set backbone=gru4rec" ;;
    fortress-gru4rec) echo "--set mode=fortress --set backbone=gru4rec" ;;
    fortress-sasrec-no-*) echo "--set mode=fortress --set ${1#fortress-sasrec-no-}=false" ;;
    *) echo "unknown row $1 (rows: ${ALL_ROWS[*]})" >&2; return 1 ;;
  esac
}

one() {
  local name=$1 seed=$2 dir=$OUT/$1/s$2 init=""
  [ -f "$dir/results.json" ] && return 0
  case $name in
    *gru4rec*) init=${INIT_GRU4REC:-} ;;
    *) init=${INIT_SASREC:-} ;;
  esac
  local args
  args=$(row_args "$name")
  mkdir -p "$dir"
  echo "$(date +%T) start $name seed $seed${init:+ from $init}" >&2
  # shellcheck disable=SC2086
  if ! "${CMD[@]}" run --data "$DATA" --out "$dir" --quiet --resume $args \
      --set rounds="$ROUNDS" --set seed="$seed" --set eval_every=100 --set threads=1 \
      --set checkpoint_every=50 ${init:+--set init_from="$init"} > "$dir.log" 2>&1; then
    echo "FAILED $name seed $seed (log: $dir.log)" >&2
    tail -5 "$dir.log" >&2
    return 1
  fi
  rm -f "$dir/checkpoint.pt"
  echo "$(date +%T) done  $name seed $seed" >&2
}

for name in "${ROWS[@]}"; do row_args "$name" > /dev/null; done
status=0
running=0
for seed in $SEEDS; do
  for name in "${ROWS[@]}"; do
    one "$name" "$seed" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
      wait -n || status=1
      running=$((running - 1))
    fi
  done
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
echo "$(date +%T) grid done (status $status)" >&2
exit $status
