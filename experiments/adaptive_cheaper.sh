#!/bin/bash
# Verify the cheaper defaults (probe_users=128, bounds.SKETCH=1024) on the cells the exposure cap and the
# coherence rule matter for; resumable (a finished run is skipped). Ran as seed 0 first, then seeds 1-2 (same cells).
cd "$(dirname "$0")/.."   # the repository root (run there from a snapshot of commit 00d3c5d)
B=../shared/data/amazon-baby-chrono/Baby_chrono.txt
one() { out=$1; shift; [ -f $out/results.json ] && return; nice -n 5 .venv/bin/fortress run --quiet --overwrite --out $out "$@" --set threads=1 > $out.log 2>&1; echo "$out $(date +%T)"; }
long() { d=$1; tag=$2; a=$3; one runs/adapt5/$tag-$a-200 --data $d --set init_from=runs/$tag/fortress-warm --set rounds=200 --set eval_every=20 --set attack=$a --set attack_ratio=0.05 --set defence=fortress --set seed=1; }
long amazon-cell-phones cell ramp
long amazon-cell-phones cell evade
nice -n 5 .venv/bin/python bench/defences.py --data amazon-cell-phones --init runs/cell/fortress-warm --seeds 0,1,2 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.05,0.01 --defences fortress --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt5/cell --out docs/bench/adaptive-cell-cheaper.json
long $B baby ramp
long $B baby evade
nice -n 5 .venv/bin/python bench/defences.py --data $B --init runs/baby/fortress-warm --seeds 0,1,2 --attacks ahum,psmu,stealth,ramp,weight --ratios 0.05,0.01 --defences fortress --skip ahum:none,psmu:none,stealth:none,ramp:none,weight:none --rounds 30 --eval-every 6 --jobs 1 --runs runs/adapt5/baby --out docs/bench/adaptive-baby-cheaper.json
one runs/adapt5/cell-none-200 --data amazon-cell-phones --set init_from=runs/cell/fortress-warm --set rounds=200 --set eval_every=20 --set defence=fortress --set seed=1
echo ALL DONE
