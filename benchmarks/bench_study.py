"""The main job's inner loops, before and after their speed-ups (issue 28).

``locating crops``: 64 crops of 64 px located in a 512^2 frame (the study's frame check),
skimage's ``match_template`` per crop (before) against the shared-FFT correlator of
:func:`defectscope.evaluation.provenance.locate_patches` (now).

``batch-norm re-estimation``: the statistics of 256 patches after each epoch, in fp32
passes (before) against passes at the training's precision (now: bf16 autocast where the
CPU has native bf16, else the same fp32).

The CPU is recorded with each result (``extra_info["cpu"]``). Run::

    .venv/bin/python -m pytest benchmarks/bench_study.py \\
        --benchmark-json=benchmarks/results/study.json
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.evaluation.provenance import locate_patches, match_template
from defectscope.simulate.lattice import lattice_image
from defectscope.util.system import cpu_description


@pytest.fixture(scope="module")
def frame_and_crops():
    frame = (lattice_image((512, 512), spacing=9.0, noise=0.2, seed=3) * 200).clip(0, 255)
    rng = np.random.default_rng(1)
    corners = rng.integers(0, 512 - 64, (64, 2))
    crops = np.stack([frame[y : y + 64, x : x + 64] for y, x in corners])
    return frame, crops, corners


@pytest.mark.parametrize("how", ("per-crop skimage", "shared FFT"))
def test_locate_crops(benchmark, frame_and_crops, how):
    benchmark.group = "locating 64 crops in a 512^2 frame"
    benchmark.extra_info["cpu"] = cpu_description()
    frame, crops, corners = frame_and_crops

    def per_crop():
        best = [match_template(frame, crop) for crop in crops]
        return np.array([np.unravel_index(b.argmax(), b.shape) for b in best])

    if how == "shared FFT":
        positions = benchmark.pedantic(
            lambda: locate_patches(frame, crops, threshold=0.97)[0], rounds=3, warmup_rounds=1
        )
    else:
        positions = benchmark.pedantic(per_crop, rounds=3, warmup_rounds=1)
    np.testing.assert_array_equal(positions, corners)


@pytest.mark.parametrize("how", ("fp32 passes", "training's precision"))
def test_batchnorm_reestimation(benchmark, how):
    torch = pytest.importorskip("torch")
    from defectscope.nets.vgg import build_model
    from defectscope.training.loop import BATCHNORM_PATCHES, recalibrate_batchnorm

    benchmark.group = f"batch-norm re-estimation, {BATCHNORM_PATCHES} patches"
    benchmark.extra_info["cpu"] = cpu_description()
    torch.manual_seed(0)
    model = build_model(4, weights="none", architecture="vgg16_bn")
    inputs = np.random.default_rng(0).normal(size=(BATCHNORM_PATCHES, 3, 64, 64))
    inputs = inputs.astype(np.float32)
    precision = "fp32" if how == "fp32 passes" else "auto"
    assert benchmark.pedantic(
        lambda: recalibrate_batchnorm(model, inputs, 32, precision), rounds=3, warmup_rounds=1
    )
