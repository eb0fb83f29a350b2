"""The scale step's cost: deciding a frame's factor (lattice periods, match, refinement)
and resampling it by 1.1.

What a map adds before tiling when a frame is scaled to the model
(:mod:`defectscope.tiling.lattice`, :mod:`defectscope.tiling.resample`), on 512^2 and
2048^2 uint16 lattice frames; compare with the map's own time in ``dense.json`` /
``end_to_end.json``. The CPU is recorded with each result (``extra_info["cpu"]``).

Run::

    .venv/bin/python -m pytest benchmarks/bench_scale.py \\
        --benchmark-json=benchmarks/results/scale.json
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.artifacts.metadata import ModelScale
from defectscope.maps.scale import decide_scale, refine_factor
from defectscope.simulate.lattice import lattice_image
from defectscope.tiling.lattice import measure_frame_periods, measure_patch_periods
from defectscope.tiling.resample import resample_frame, resampled_shape
from defectscope.util.system import cpu_description

SIZES = [512, 2048]
FACTOR = 1.1


@pytest.fixture(scope="module", params=SIZES, ids=lambda size: f"{size}^2")
def frame(request) -> np.ndarray:
    image = lattice_image((request.param, request.param), spacing=9.0, noise=0.1, seed=1)
    return (image * 20000 + 2000).clip(0, 65535).astype(np.uint16)


def test_measure_frame_periods(benchmark, frame):
    benchmark.group = f"scale {frame.shape[0]}^2"
    benchmark.extra_info["cpu"] = cpu_description()
    result = benchmark(measure_frame_periods, frame)
    assert result.primary == pytest.approx(9.0, rel=0.01)


def test_resample_frame(benchmark, frame):
    benchmark.group = f"scale {frame.shape[0]}^2"
    benchmark.extra_info["cpu"] = cpu_description()
    out = np.empty(resampled_shape(frame.shape, FACTOR), np.float32)
    result = benchmark.pedantic(
        resample_frame, args=(frame, FACTOR), kwargs={"out": out}, rounds=3, warmup_rounds=1
    )
    assert result.shape == resampled_shape(frame.shape, FACTOR)


@pytest.fixture(scope="module")
def model_scale() -> ModelScale:
    """A model whose 64 px patches show the lattice at 9.9 px: frames at 9 px need x1.1."""
    image = lattice_image((640, 640), spacing=9.0 * FACTOR, noise=0.1, seed=2)
    corners = np.random.default_rng(0).integers(0, 640 - 64, (300, 2))
    patches = np.stack([image[y : y + 64, x : x + 64] for y, x in corners])
    return ModelScale(lattice=measure_patch_periods(patches))


def test_refine_factor(benchmark, frame, model_scale):
    """The refinement alone: 144 model-sized patches cut, resampled and measured."""
    benchmark.group = f"scale {frame.shape[0]}^2"
    benchmark.extra_info["cpu"] = cpu_description()
    result = benchmark.pedantic(
        refine_factor, args=(frame, FACTOR, model_scale.lattice), rounds=3, warmup_rounds=1
    )
    assert result == pytest.approx(FACTOR, rel=0.01)


def test_measure_and_resample(benchmark, frame, model_scale):
    """The whole scale step of an uncalibrated frame: decide (measure, match, refine),
    then resample."""
    benchmark.group = f"scale {frame.shape[0]}^2"
    benchmark.extra_info["cpu"] = cpu_description()

    def step() -> np.ndarray:
        decision = decide_scale(frame, None, model_scale, "auto", min_side=64)
        return resample_frame(frame, decision.factor)

    result = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert result.dtype == np.float32
    assert (
        result.shape == resampled_shape(frame.shape, FACTOR)
        or abs(result.shape[0] / frame.shape[0] - FACTOR) < 0.01
    )
