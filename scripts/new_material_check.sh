#!/usr/bin/env bash
# Issue 28's check as a new user would run it: `simulate` with its defaults, `train
# --simulated` from the shipped trunk, then abTEM multislice frames (another simulator,
# never trained on) with Sr and Ti vacancies, scored by `score-simulated` (all regions,
# then known regions). About 40 min on 2 cores, most of it multislice (~2.5 min per
# 192^2 frame). OUT=... to choose the folder; SEEDS="1000 1001" the multislice sets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
D=.venv/bin/defectscope
OUT=${OUT:-runs/new-material}
mkdir -p "$OUT"
[ -f "$OUT/fast/truth.json" ] || $D simulate --structure srtio3 --defects vacancy --out "$OUT/fast"
[ -f "$OUT/model/model.json" ] || $D train --simulated "$OUT/fast" --out "$OUT/model"
[ -f "$OUT/fast-test/truth.json" ] || $D simulate --structure srtio3 --defects vacancy --frames 6 \
  --size 512 --seed 2000 --vary 0 --out "$OUT/fast-test"
for known in "" --known-only; do
  $D score-simulated "$OUT/model" "$OUT/fast-test" $known --json "$OUT/score-fast-test$known.json"
done
for seed in ${SEEDS:-1000 1001}; do
  dir=$OUT/multislice-$seed
  [ -f "$dir/truth.json" ] || $D simulate --structure srtio3 --defects vacancy:Sr,vacancy:Ti \
    --thickness 4 --renderer multislice --prism 4 --scan-sampling 0.4 --frames 6 --size 192 \
    --defects-per-frame 2 --seed "$seed" --vary 0 --out "$dir"
  for known in "" --known-only; do
    $D score-simulated "$OUT/model" "$dir" --stride 8 $known --json "$OUT/score-multislice-$seed$known.json"
  done
done
