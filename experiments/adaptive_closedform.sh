#!/bin/bash
# The seed-0 verdict cells at 5% (every attack the server sees, both datasets) re-run with the closed-form
# regulariser (commit 7de5977); it ran from a snapshot of that commit (`git archive 7de5977 src bench` into
# /tmp/snap2, PYTHONPATH=/tmp/snap2/src) while the tree moved on. Outputs: docs/bench/adaptive-*-closedform.json.
cd "$(dirname "$0")/.."
B=../shared/data/amazon-baby-chrono/Baby_chrono.txt
SNAP=${SNAP:-.}                       # the code to run: a snapshot folder holding src/ and bench/, or the tree
export PYTHONPATH=$SNAP/src
nice -n 5 .venv/bin/python $SNAP/bench/defences.py --data amazon-cell-phones --init runs/cell/fortress-warm --seeds 0 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.05 --defences fortress --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt6/cell --out docs/bench/adaptive-cell-closedform.json
nice -n 5 .venv/bin/python $SNAP/bench/defences.py --data $B --init runs/baby/fortress-warm --seeds 0 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.05 --defences fortress --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt6/baby --out docs/bench/adaptive-baby-closedform.json
# Then, with the code of commit c85a8c6 (the tree), the rest of the verdict grid: seed 0 at 1%, seeds 1-2 at 1% and 5%.
for d in cell baby; do
  data=amazon-cell-phones; [ $d = baby ] && data=$B
  nice -n 5 .venv/bin/python bench/defences.py --data $data --init runs/$d/fortress-warm --seeds 0 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.01 --defences fortress --no-clean --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt7/$d --out docs/bench/adaptive-$d-closedform-1pct.json
  nice -n 5 .venv/bin/python bench/defences.py --data $data --init runs/$d/fortress-warm --seeds 1,2 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.05,0.01 --defences fortress --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt7/$d --out docs/bench/adaptive-$d-closedform-s12.json
done
echo ALL DONE
