"""Tiler speed: the C++ tiler against the plain numpy equivalent.

Run::

    .venv/bin/python -m pytest benchmarks/bench_tiling.py \
        --benchmark-json=benchmarks/results/tiling.json
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.tiling.tiler import Normalization, tile, tile_numpy, window_origins

MODES = ["zscore", "minmax", "imagenet"]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65535, (2048, 2048), dtype=np.uint16)


@pytest.mark.parametrize("stride", [16, 32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["cpp", "numpy"])
def test_tile_2048(benchmark, frame, impl, mode, stride):
    benchmark.group = f"tile 2048^2 uint16 stride {stride} {mode}"
    norm = Normalization(mode=mode)
    if impl == "cpp":
        origins = window_origins(frame.shape, 64, stride)
        out = np.empty((len(origins), 3, 64, 64), np.float32)
        result = benchmark(tile, frame, 64, origins=origins, normalization=norm, out=out)
    else:
        result = benchmark.pedantic(
            tile_numpy, args=(frame, 64, stride), kwargs={"normalization": norm}, rounds=2
        )
    # both paths must give the same patches
    check = tile_numpy(frame[:256, :256], 64, stride, normalization=norm)
    np.testing.assert_allclose(
        tile(frame[:256, :256], 64, stride, normalization=norm), check, rtol=1e-6, atol=1e-6
    )
    assert result.shape[1:] == (3, 64, 64)
