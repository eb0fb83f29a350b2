#!/usr/bin/env bash
# Issue 14's measurement: train on fast-renderer frames only, then map abTEM multislice
# frames (another simulator, never trained on) and frames of the fast renderer with other
# seeds, and match regions to the truth. Then, where the public patches are found, the
# grouped 5-fold of SrTiO3 with and without the simulated trunk
# (scripts/pretraining_kfold.py). Hours on a 2-core CPU (multislice ~3.5 min per 192^2
# frame, training ~25 min); OUT=... MATERIALS="srtio3 cdte" to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
D=.venv/bin/defectscope
OUT=${OUT:-runs/simulated}
EPOCHS=${EPOCHS:-12}
for material in ${MATERIALS:-srtio3 cdte}; do
  case $material in
    srtio3) crystal=(--structure srtio3 --zone 0,0,1 --defects 'vacancy:Sr,vacancy:Ti,substitution:Ti>Nb') ;;
    cdte) crystal=(--structure cdte --zone 1,1,0 --defects 'vacancy:Cd,vacancy:Te,interstitial:Te') ;;
    *) echo "error: unknown material $material" >&2; exit 1 ;;
  esac
  dir=$OUT/$material
  common=(--thickness 4 --pixel-size 0.02 --unit nm --probe-fwhm 0.08)
  [ -f "$dir/fast/truth.json" ] || $D simulate "${crystal[@]}" "${common[@]}" --frames 32 --size 512 --vary 0.2 \
    --exponent-range 1.5 3.2 --column-scatter 0.05 --out "$dir/fast"
  [ -f "$dir/fast-test/truth.json" ] || $D simulate "${crystal[@]}" "${common[@]}" --frames 6 --size 512 --seed 2000 --out "$dir/fast-test"
  [ -f "$dir/multislice/truth.json" ] || $D simulate "${crystal[@]}" "${common[@]}" --renderer multislice --prism 4 --scan-sampling 0.4 \
    --frames 6 --size 192 --defects-per-frame 2 --seed 1000 --out "$dir/multislice"
  [ -f "$dir/model/model.json" ] || $D train --simulated "$dir/fast" --out "$dir/model" --epochs "$EPOCHS"
  for test in fast-test multislice; do
    $D score-simulated "$dir/model" "$dir/$test" --stride 8 --json "$dir/score-$test.json"
  done
done
if [ -f "$OUT/srtio3/model/weights.pt" ] && .venv/bin/python -c "from defectscope.io.datasets import locate_upstream; locate_upstream(download=False)" 2>/dev/null; then
  .venv/bin/python scripts/pretraining_kfold.py sto "$OUT/srtio3/model/weights.pt" "$OUT/pretraining-kfold-sto.json" 15 5
fi
