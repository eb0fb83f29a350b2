"""The main job, end to end, for one public dataset.

study (random vs grouped split, frame map) -> ONNX + INT8 export -> clustering of
the patches -> ROIs of the large frame -> HTML report, all under one run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from defectscope.training.config import TrainConfig


def run_pipeline(
    dataset: str,
    out_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    config: TrainConfig = TrainConfig(),
    top_rois: int = 10,
    calibration_size: int = 256,
    folds: int = 5,
    loco: bool = True,
    resume: bool = False,
) -> Path:
    """Run every step of the demo for ``dataset`` ('cdte' or 'sto'); returns the report path.

    ``resume`` reuses the trainings an interrupted run into ``out_dir`` finished
    (see :func:`defectscope.studies.study.run_study`).
    """
    from defectscope.export.recipe import CalibrationSplit, export_model
    from defectscope.io.datasets import (
        DATASET_FRAMES,
        dataset_folder,
        load_patches,
        locate_upstream,
    )
    from defectscope.io.files import atomic_write_json
    from defectscope.io.frames import read_image
    from defectscope.maps.detector import Detector
    from defectscope.outputs.clusters import cluster_dataset
    from defectscope.outputs.report import write_report
    from defectscope.studies.study import run_study
    from defectscope.util.progress import StepTimer

    out = Path(out_dir)
    steps = StepTimer()
    upstream = locate_upstream(data)
    folder = dataset_folder(upstream, dataset)
    frame_path = upstream / DATASET_FRAMES[dataset.lower()]
    frame_path = frame_path if frame_path.is_file() else None
    with steps("loading patches"):
        patches = load_patches(folder)
    print(f"{folder}: {len(patches.labels)} patches, classes {patches.counts()}")
    study = run_study(
        patches,
        out,
        config,
        dataset_name=dataset,
        frame=frame_path,
        folds=folds,
        loco=loco,
        steps=steps,
        resume=resume,
    )
    print((out / "summary.md").read_text())

    # The exported model is the grouped split's: INT8 is calibrated on patches it trained
    # on and scored on its grouped test split, regions it never saw, as FP32 was.
    model_dir = out / "model"
    grouped = study["grouped"]
    train_index = np.asarray(grouped["train_index"], dtype=np.int64)
    evaluable = [patches.classes.index(c) for c in grouped["split"]["evaluable_classes"]]
    test_index = np.asarray(grouped["test_index"], dtype=np.int64)
    test_index = test_index[np.isin(patches.labels[test_index], evaluable)]
    rng = np.random.default_rng(config.seed)
    split = CalibrationSplit(
        calibration=rng.permutation(train_index)[:calibration_size],
        held_out=test_index,
        check=test_index[:64],
        notes={
            "calibration_patches": "grouped split, training part",
            "evaluation_patches": "grouped split, test part, evaluable classes",
        },
    )
    with steps("ONNX export, INT8 calibration and comparison"):
        # The export recipe of ``defectscope export``: FP32, both INT8 targets, merged
        # into export.json.
        export = export_model(model_dir, ("onnx", "int8"), patches, split=split)
    print(f"export: {export}")

    with steps("clustering embeddings"):
        # The embeddings of the engine just exported (INT8 on a CPU), as `cluster` takes them.
        cluster = cluster_dataset(folder, model_dir, out / "cluster", backend="auto")
    print(
        f"clusters: learned {cluster['learned']['k']} (ARI {cluster['learned']['ari']:.3f}), "
        f"raw pixels {cluster['raw_pixels']['k']} (ARI {cluster['raw_pixels']['ari']:.3f})"
    )
    if frame_path is not None:
        with steps("ranking ROIs in the large frame"):
            with Detector.load(model_dir, backend="auto") as det:
                rois = det.rois(read_image(frame_path), k=top_rois, stride=16)
            atomic_write_json(out / "rois.json", rois)
    atomic_write_json(out / "timings.json", steps.seconds)
    with steps("writing the report"):
        report = write_report(out)
    atomic_write_json(out / "timings.json", steps.seconds)
    print(f"\n{dataset}: time per step\n{steps.table()}\n")
    return report
