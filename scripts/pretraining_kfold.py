"""Grouped k-fold accuracy of a public patch set with and without simulated pretraining.

Usage: python scripts/pretraining_kfold.py DATASET PRETRAINED_WEIGHTS OUT.json [EPOCHS] [FOLDS]

DATASET is ``cdte`` or ``sto``; PRETRAINED_WEIGHTS is the ``weights.pt`` of a model
trained with ``defectscope train --simulated``. Both arms use the same grouped folds
(every testable group tested once), the same seed and the same training settings; only
the starting weights differ (random initialization, or the simulated model's trunk with a
new head).
"""

import dataclasses
import json
import sys
import time

from defectscope.evaluation.grouping import find_groups
from defectscope.evaluation.metrics import grouped_folds
from defectscope.io.datasets import dataset_folder, load_patches, locate_upstream
from defectscope.io.files import atomic_write_json
from defectscope.studies.study import cross_validate
from defectscope.training.config import TrainConfig


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    dataset, pretrained, out = argv[:3]
    epochs = int(argv[3]) if len(argv) > 3 else 15
    n_folds = int(argv[4]) if len(argv) > 4 else 5
    patches = load_patches(dataset_folder(locate_upstream(), dataset))
    groups = find_groups(patches.images).ids
    splits = grouped_folds(patches.labels, groups, patches.classes, n_folds=n_folds, seed=0)
    config = TrainConfig(epochs=epochs)
    results = {"dataset": dataset, "epochs": epochs, "splits": [s.describe() for s in splits]}
    for arm, weights in (("random init", "none"), ("simulated pretraining", pretrained)):
        started = time.perf_counter()
        arm_config = dataclasses.replace(config, weights=weights)
        results[arm] = cross_validate(patches, splits, arm_config, progress=True, densities=False)
        results[arm]["seconds"] = time.perf_counter() - started
        summary = {k: results[arm][k] for k in ("accuracy", "macro_f1", "ece_after")}
        print(arm, json.dumps(summary), flush=True)
        atomic_write_json(out, results)


if __name__ == "__main__":
    main(sys.argv[1:])
