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
    from defectscope.tiling.tiler import patches_to_inputs
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
    inputs = patches_to_inputs(patches.images, config.normalization)
    rng = np.random.default_rng(config.seed)
    calib = rng.permutation(train_index)[:calibration_size]
    with steps("ONNX export, INT8 calibration and comparison"):
        export = _export(model_dir, inputs, calib, test_index, patches.labels)
    atomic_write_json(model_dir / "export.json", export)
    print(f"export: {export}")

    with steps("clustering embeddings"):
        cluster = cluster_dataset(folder, model_dir, out / "cluster", backend="torch")
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


def _export(model_dir: Path, inputs, calib, test_index, labels) -> dict:
    """FP32 ONNX (checked against PyTorch) and INT8 (calibrated, compared on test patches)."""
    from defectscope.export.compare import compare_engines
    from defectscope.export.int8 import quantize_onnx_int8
    from defectscope.export.onnx import export_onnx

    export = {"onnx": export_onnx(model_dir, model_dir / "model.onnx", inputs[test_index[:64]])}
    quantize_onnx_int8(model_dir / "model.onnx", model_dir / "model.int8.onnx", inputs[calib])
    export["int8"] = {
        "n_calibration": len(calib),
        "calibration_patches": "grouped split, training part",
        "evaluation_patches": "grouped split, test part, evaluable classes",
        **compare_engines(
            model_dir / "model.onnx",
            model_dir / "model.int8.onnx",
            inputs[test_index],
            labels[test_index],
        ),
    }
    return export
