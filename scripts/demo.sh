#!/usr/bin/env bash
# Set everything up, then run the main job for CdTe and SrTiO3: train, evaluate honestly
# (random vs grouped split), map the large frame, export ONNX + INT8, cluster embeddings,
# rank ROIs and write runs/<dataset>/report.html.
# Data: --data PATH, else $DEFECTSCOPE_DATA, else ../shared/datasets/..., else a download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/defectscope demo --dataset ${DATASETS:-cdte sto} --epochs "${EPOCHS:-30}" --out runs "$@"
