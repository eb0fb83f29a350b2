"""Resampling a frame by a zoom factor: shapes, the pixel-centre convention, the band-by-
band result against a one-shot scipy computation, memmaps, byte orders, hostile input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.ndimage as ndi

from defectscope.simulate.lattice import column_profile
from defectscope.tiling.resample import (
    resample_frame,
    resampled_shape,
    to_frame_coordinates,
    to_resampled_coordinates,
)

FACTORS = [0.37, 0.8, 1.1, 1.3, 2.6]


def one_shot(frame: np.ndarray, factor: float) -> np.ndarray:
    """The contract computed directly on the whole frame: Gaussian anti-aliasing when
    shrinking, then a cubic spline sampled where each output pixel's centre falls,
    ``y = (y_r + 0.5) / f - 0.5`` (written out here, not taken from the module)."""
    data = frame.astype(np.float64)
    sigma = max(0.0, (1 / factor - 1) / 2)
    if sigma > 0:
        data = ndi.gaussian_filter(data, sigma, mode="reflect")
    shape = (round(frame.shape[0] * factor), round(frame.shape[1] * factor))
    rows = (np.arange(shape[0]) + 0.5) / factor - 0.5
    cols = (np.arange(shape[1]) + 0.5) / factor - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndi.map_coordinates(data, grid, order=3, mode="reflect")


def test_shapes():
    assert resampled_shape((100, 201), 1.1) == (110, 221)
    assert resampled_shape((512, 512), 0.85) == (435, 435)
    assert resampled_shape((3, 3), 0.2) == (1, 1)
    out = resample_frame(np.zeros((100, 201), np.uint8), 1.1)
    assert out.shape == (110, 221) and out.dtype == np.float32


@pytest.mark.parametrize("factor", [*FACTORS, 1.0])
@pytest.mark.parametrize("band_rows", [1, 7, None])
def test_band_by_band_equals_one_shot(factor, band_rows):
    frame = np.random.default_rng(0).normal(size=(203, 157)).astype(np.float32)
    result = resample_frame(frame, factor, band_rows=band_rows)
    # float32 output: the reference rounded to float32 is as close as it can be
    np.testing.assert_allclose(result, one_shot(frame, factor), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [0.6, 0.85, 1.23, 2.0])
def test_a_blob_lands_where_the_coordinates_say(factor):
    rows, cols = np.indices((120, 130), dtype=np.float64)
    centre = (50.3, 71.8)
    blob = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 3.0**2))
    out = resample_frame(blob, factor).astype(np.float64)
    rows, cols = np.indices(out.shape)
    found = ((out * rows).sum() / out.sum(), (out * cols).sum() / out.sum())
    expected = to_resampled_coordinates(*centre, factor)
    np.testing.assert_allclose(found, expected, atol=0.1)
    np.testing.assert_allclose(to_frame_coordinates(*found, factor), centre, atol=0.1 / factor)


def test_coordinates_round_trip_and_convention():
    rng = np.random.default_rng(1)
    y, x = rng.uniform(-10, 5000, (2, 50))
    for factor in (0.25, 0.85, 1.0, 1.137, 4.0):
        back = to_frame_coordinates(*to_resampled_coordinates(y, x, factor), factor)
        np.testing.assert_allclose(back, (y, x), rtol=1e-12, atol=1e-9)
        there = to_resampled_coordinates(*to_frame_coordinates(y, x, factor), factor)
        np.testing.assert_allclose(there, (y, x), rtol=1e-12, atol=1e-9)
    # the frame's outer edges (-0.5 and H - 0.5) stay the outer edges
    ry, rx = to_resampled_coordinates([-0.5, 99.5], [-0.5, 199.5], 1.1)
    np.testing.assert_allclose(ry, [-0.5, 110 - 0.5])
    np.testing.assert_allclose(rx, [-0.5, 220 - 0.5])
    fy, fx = to_frame_coordinates(0, 0, 2.0)
    assert float(fy) == float(fx) == -0.25


def test_a_lattice_resampled_is_the_lattice_at_the_new_scale():
    # Gaussian columns of sigma 1.5 px, spacing 8, resampled by 1.1, against the lattice
    # rendered at spacing 8.8 on the output grid (analytic, no interpolation).
    def lattice(size, spacing, sigma, shift):
        t = np.arange(size, dtype=np.float64) + shift
        profile = column_profile(t, spacing, sigma)
        return np.outer(profile, profile)

    factor = 1.1
    source = lattice(300, 8.0, 1.5, 0.0)
    out = resample_frame(source, factor)
    # output pixel y_r sees input (y_r + 0.5) / f - 0.5: the lattice scaled by f, shifted
    truth = lattice(out.shape[0], 8.0 * factor, 1.5 * factor, 0.5 - 0.5 * factor)
    inner = slice(10, -10)
    error = out[inner, inner] - truth[inner, inner]
    assert np.sqrt(np.mean(error**2)) < 0.005 * np.ptp(truth)
    assert out[inner, inner].max() == pytest.approx(truth.max(), rel=0.01)


def test_memmap_in_and_out(tmp_path):
    frame = (np.random.default_rng(2).random((600, 500)) * 60000).astype(np.uint16)
    source = np.lib.format.open_memmap(tmp_path / "in.npy", "w+", np.uint16, frame.shape)
    source[:] = frame
    source.flush()
    source = np.load(tmp_path / "in.npy", mmap_mode="r")
    shape = resampled_shape(frame.shape, 0.7)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float32, shape)
    result = resample_frame(source, 0.7, out=out, band_rows=16)
    assert result is out
    reference = one_shot(frame, 0.7)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference, rtol=1e-6, atol=0.05)


def test_a_memmapped_frame_is_never_read_whole(tmp_path):
    shape = (4096, 1024)
    source = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.uint16, shape)
    source[::7] = 1000
    source.flush()
    source = np.load(tmp_path / "big.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(
        tmp_path / "out.npy", "w+", np.float32, resampled_shape(shape, 1.1)
    )
    tracemalloc.start()
    try:
        resample_frame(source, 1.1, out=out, band_rows=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the whole frame as float64 would be 32 MiB; a band of 64 output rows is ~100 rows
    assert peak < 8 * 2**20
    assert out[::50].max() == pytest.approx(1000, rel=0.05)


def test_default_bands_bound_memory(tmp_path):
    # a frame of 16 Mpx read with the default bands (2 Mpx, doubled by the spline
    # prefilter): nothing near a copy of it as float64 (128 MiB)
    shape = (4096, 4096)
    source = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.uint16, shape)
    source[::5, ::3] = 500
    source.flush()
    source = np.load(tmp_path / "big.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(
        tmp_path / "out.npy", "w+", np.float32, resampled_shape(shape, 0.5)
    )
    tracemalloc.start()
    try:
        resample_frame(source, 0.5, out=out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20


@pytest.mark.parametrize("dtype", [">u2", ">f4", ">f8", "<i4", "bool"])
def test_dtypes_and_byte_orders(dtype):
    frame = (np.random.default_rng(3).random((80, 90)) * 1000).astype(np.uint16)
    if dtype == "bool":
        frame = frame > 500
    native = resample_frame(frame.astype(np.float64), 1.3)
    np.testing.assert_array_equal(resample_frame(frame.astype(dtype), 1.3), native)


def test_non_finite_pixels_stay_local():
    frame = np.random.default_rng(4).normal(size=(100, 100))
    frame[40, 60] = np.nan
    for factor in (1.3, 0.5):
        out = resample_frame(frame, factor)
        bad = np.argwhere(~np.isfinite(out))
        assert 0 < len(bad) < 40
        where = np.array(to_resampled_coordinates(40, 60, factor))
        assert np.abs(bad - where).max() <= 2 + 2 * (1 / factor - 1) + 1


@pytest.mark.parametrize("factor", [0, -1, float("nan"), float("inf"), 1e-9, True, "1.1", None])
def test_hostile_factors_raise_naming_the_value(factor):
    frame = np.zeros((64, 64), np.uint8)
    named = "nothing is left" if factor == 1e-9 else "finite number > 0"
    for call in (
        lambda: resample_frame(frame, factor),
        lambda: resampled_shape(frame.shape, factor),
    ):
        with pytest.raises(ValueError, match=named) as error:
            call()
        assert repr(factor) in str(error.value)
    if factor != 1e-9:
        with pytest.raises(ValueError, match="finite number > 0"):
            to_frame_coordinates(1.0, 1.0, factor)
        with pytest.raises(ValueError, match="finite number > 0"):
            to_resampled_coordinates(1.0, 1.0, factor)


def test_bad_frames_and_outputs_raise():
    with pytest.raises(ValueError, match="frame must be a non-empty"):
        resample_frame(np.zeros((2, 8, 8)), 1.1)
    with pytest.raises(ValueError, match="frame must be a non-empty"):
        resample_frame(np.zeros((0, 8)), 1.1)
    with pytest.raises(ValueError, match="real numbers"):
        resample_frame(np.zeros((8, 8), complex), 1.1)
    with pytest.raises(ValueError, match=r"out must be a float32 array of shape \(11, 11\)"):
        resample_frame(np.zeros((10, 10)), 1.1, out=np.zeros((11, 11)))
    with pytest.raises(ValueError, match="out must be"):
        resample_frame(np.zeros((10, 10)), 1.1, out=np.zeros((10, 10), np.float32))
    read_only = np.zeros((11, 11), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        resample_frame(np.zeros((10, 10)), 1.1, out=read_only)
    with pytest.raises(ValueError, match="band_rows"):
        resample_frame(np.zeros((10, 10)), 1.1, band_rows=0)
