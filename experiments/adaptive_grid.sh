#!/bin/sh
# The adaptive-attack measurement grid, phase by phase (each phase resumes: finished cells are not run again).
# Run from anywhere; cells land in runs/$G-<d>[-long] (G=adapt4 unless set) (resumable), JSON in docs/bench/adaptive-*.json.
# Needs runs/<d>/fortress-warm (docs/results/adaptive.md gives the commands). Cells without a defence do
# not depend on the server's code: copy (or link) them from an earlier grid's folder to skip them.
cd "$(dirname "$0")/.."

PY=".venv/bin/python bench/defences.py"
G=${G:-adapt4}
B=../shared/data/amazon-baby-chrono/Baby_chrono.txt
ALL=random,popular,ahum,psmu,stealth,ramp,weight
SKIP=stealth:none,ramp:none
mkdir -p runs
run() { echo "== $(date +%T) $*"; $PY "$@" --jobs 2 > /dev/null 2>> runs/adaptive-grid.err || echo "FAILED $*"; }
short() { run "$@" --rounds 30 --eval-every 6; }
data() { if [ $1 = cell ]; then echo amazon-cell-phones; else echo $B; fi; }
# phase 1: the verdict at 100 attack rounds, 5% malicious clients, seeds 0, 1, 2
for d in cell baby; do
  run --data $(data $d) --init runs/$d/fortress-warm --seeds 0,1,2 --no-clean --attacks random,popular,stealth,ramp --ratios 0.05 --defences none,fortress --skip $SKIP,popular:fortress --rounds 100 --eval-every 20 --runs runs/$G-$d-long --out docs/bench/adaptive-$d-100rounds.json
done
# phase 2: the verdict cells at 30 rounds (floors, adaptive attacks, clean) on seeds 0, 1, 2
for d in cell baby; do
  short --data $(data $d) --init runs/$d/fortress-warm --seeds 0,1,2 --attacks random,popular,stealth,ramp --ratios 0.01,0.05 --defences none,fortress --skip $SKIP,random:fortress,popular:fortress --runs runs/$G-$d --out docs/bench/adaptive-$d-3seeds.json
done
# phase 3: every attack, seed 0
for d in cell baby; do
  short --data $(data $d) --init runs/$d/fortress-warm --seeds 0 --attacks $ALL --ratios 0.01,0.05 --defences none,fortress --skip $SKIP --runs runs/$G-$d --out docs/bench/adaptive-$d.json
done
# phase 4: the rest of the suite on seeds 0, 1, 2 (defended cells)
for d in cell baby; do
  short --data $(data $d) --init runs/$d/fortress-warm --seeds 0,1,2 --attacks $ALL --ratios 0.01,0.05 --defences none,fortress --skip $SKIP,ahum:none,psmu:none,weight:none --runs runs/$G-$d --out docs/bench/adaptive-$d-3seeds.json
done
# phase 5: 10% malicious clients, seed 0
for d in cell baby; do
  short --data $(data $d) --init runs/$d/fortress-warm --seeds 0 --no-clean --attacks random,popular,stealth,ramp --ratios 0.1 --defences none,fortress --skip $SKIP --runs runs/$G-$d --out docs/bench/adaptive-$d-10pct.json
done
echo "== $(date +%T) done"
