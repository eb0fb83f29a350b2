#!/usr/bin/env bash
# Set everything up, then run the main job: train on CdTe (and SrTiO3), evaluate
# honestly (random vs grouped split), write results under runs/.
# Data: --data/DEFECTSCOPE_DATA, else ../shared/datasets/..., else a download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
EPOCHS=${EPOCHS:-30}
for dataset in ${DATASETS:-cdte sto}; do
  .venv/bin/defectscope study --dataset "$dataset" --out "runs/$dataset" --epochs "$EPOCHS" "$@"
done
echo "results: runs/*/summary.md, runs/*/study.json, models in runs/*/model"
