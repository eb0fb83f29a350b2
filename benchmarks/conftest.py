"""Fixtures for the benchmark suites: a VGG-16 model directory and its ONNX exports.

Speed does not depend on the weights, so the model is randomly initialized; the
INT8 model is calibrated on synthetic lattice patches. Accuracy of INT8 on real
held-out patches is measured by the main job (``runs/<dataset>/model/export.json``).
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.export.int8 import quantize_onnx_int8
from defectscope.export.onnx import export_onnx
from defectscope.nets.checkpoint import ModelConfig, save_checkpoint
from defectscope.nets.vgg import build_model
from defectscope.simulate.lattice import lattice_image as lattice
from defectscope.tiling.tiler import tile


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench") / "model"
    classes = ("Bulk", "LC", "SF1", "SF2", "Twin_Bound", "Vacancy_CdTe", "interstitial")
    model = build_model(len(classes), architecture="vgg16_bn").eval()
    save_checkpoint(
        directory, model, ModelConfig(classes, architecture="vgg16_bn", background_class="Bulk")
    )
    export_onnx(directory, directory / "model.onnx")
    frame = (lattice((512, 512), seed=1) * 200).clip(0, 255).astype(np.uint8)
    calib = tile(frame, 64, 32)[:128]
    quantize_onnx_int8(directory / "model.onnx", directory / "model.int8.onnx", calib)
    return directory


@pytest.fixture(scope="session")
def bench_dense_model(bench_model, tmp_path_factory):
    """``bench_model`` with dense graphs (FP32 and INT8, native stride 16).

    Not adapted (no distillation steps): speed does not depend on the weights.
    """
    import shutil

    from defectscope.export.dense import make_dense

    directory = tmp_path_factory.mktemp("bench-dense") / "model"
    shutil.copytree(bench_model, directory)
    frames = [(lattice((512, 512), seed=s) * 20000 + 2000).astype(np.uint16) for s in (1, 2)]
    make_dense(directory, frames, check_frames=[], steps=0, progress=False)
    return directory
