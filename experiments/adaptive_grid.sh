#!/bin/sh
# The adaptive-attack measurement grid, phase by phase (each phase resumes: finished cells are not run again).
# Run from anywhere; cells land in runs/adapt2-<d> (resumable), JSON in docs/bench/adaptive-*.json.
# Needs runs/<d>/fortress-warm (docs/results/adaptive.md gives the commands).
cd "$(dirname "$0")/.."

PY=".venv/bin/python bench/defences.py"
B=../shared/data/amazon-baby-chrono/Baby_chrono.txt
ALL=random,popular,ahum,psmu,stealth,ramp,weight
SKIP=stealth:none,ramp:none
mkdir -p runs
run() { echo "== $(date +%T) $*"; $PY "$@" --rounds 30 --eval-every 6 --jobs 2 > /dev/null 2>> runs/adaptive-grid.err || echo "FAILED $*"; }
# phase 1: every attack, seed 0
run --data amazon-cell-phones --init runs/cell/fortress-warm --seeds 0 --attacks $ALL --ratios 0.01,0.05 --defences none,fortress --skip $SKIP --runs runs/adapt2-cell --out docs/bench/adaptive-cell.json
run --data $B --init runs/baby/fortress-warm --seeds 0 --attacks $ALL --ratios 0.01,0.05 --defences none,fortress --skip $SKIP --runs runs/adapt2-baby --out docs/bench/adaptive-baby.json
# phase 2: the verdict cells (floors, adaptive attacks, clean) on seeds 0, 1, 2
for d in cell baby; do
  if [ $d = cell ]; then D=amazon-cell-phones; else D=$B; fi
  run --data $D --init runs/$d/fortress-warm --seeds 0,1,2 --attacks random,popular,stealth,ramp --ratios 0.01,0.05 --defences none,fortress --skip $SKIP,random:fortress,popular:fortress --runs runs/adapt2-$d --out docs/bench/adaptive-$d-3seeds.json
done
# phase 3: 10% malicious clients, seed 0
for d in cell baby; do
  if [ $d = cell ]; then D=amazon-cell-phones; else D=$B; fi
  run --data $D --init runs/$d/fortress-warm --seeds 0 --no-clean --attacks random,popular,stealth,ramp --ratios 0.1 --defences none,fortress --skip $SKIP --runs runs/adapt2-$d --out docs/bench/adaptive-$d-10pct.json
done
# phase 4: the rest of the suite on seeds 0, 1, 2 (defended cells)
for d in cell baby; do
  if [ $d = cell ]; then D=amazon-cell-phones; else D=$B; fi
  run --data $D --init runs/$d/fortress-warm --seeds 0,1,2 --attacks $ALL --ratios 0.01,0.05 --defences none,fortress --skip $SKIP,ahum:none,psmu:none,weight:none --runs runs/adapt2-$d --out docs/bench/adaptive-$d-3seeds.json
done
echo "== $(date +%T) done"
