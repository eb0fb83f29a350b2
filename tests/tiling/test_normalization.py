"""The z-score does not depend on a frame's scale or offset (issue 25, findings 3, 4, 13).

Window mode (:func:`tile`, C++, against :func:`tile_numpy`) and the dense normalization
(:func:`normalize_region`, against per-pixel box statistics and against the per-window
z-score of the window centred on each pixel). Tolerances follow from the inputs: a frame
whose pixels moved by at most ``e`` (the rounding of scaling or offsetting it in its
dtype) moves a window's z-scores by at most ``(2 + max|z|) e / sd`` to first order, and
every output is a float32 (relative rounding 2**-24).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from defectscope import _tiling
from defectscope.tiling.tiler import (
    Normalization,
    normalize_region,
    normalize_region_numpy,
    tile,
    tile_numpy,
    window_origins,
)
from tests.tiling.reference import box_reference

F32 = 2.0**-24  # float32's unit roundoff: the precision of every output
ROUNDING = {"float32": 2.0**-24, "float64": 2.0**-53}
GRAY = Normalization("zscore", channels=1)
PATCH, STRIDE = 16, 8


def noise_frame(rng: np.random.Generator, shape, dtype: str, flat_block: bool) -> np.ndarray:
    """Random contrast in ``dtype`` (integers over a wide range), optionally with a
    constant 24 x 24 block so that some windows are exactly constant."""
    if np.dtype(dtype).kind in "ui":
        top = {"uint16": 4095, "uint32": 2**20 - 1}[dtype]
        frame = rng.integers(0, top, size=shape, endpoint=True).astype(dtype)
    else:
        frame = (rng.normal(size=shape) * 40 + 100).astype(dtype)
    if flat_block:
        frame[8:32, 16:40] = frame[0, 0]
    return frame


def window_stats(frame: np.ndarray, patch: int = PATCH, stride: int = STRIDE):
    """Per-window standard deviation and largest magnitude of ``frame``, in float64."""
    windows = tile_numpy(frame.astype(np.float64), patch, stride, normalization=GRAY)
    raw = np.lib.stride_tricks.sliding_window_view(frame.astype(np.float64), (patch, patch))
    origins = window_origins(frame.shape, patch, stride)
    raw = raw[origins[:, 0], origins[:, 1]]
    sd = (raw - raw[:, :1, :1]).std(axis=(1, 2))
    return windows, sd, np.abs(raw).max(axis=(1, 2))


def assert_close_windows(got, want, sd, pixel_error, note=""):
    """``got`` within the perturbation bound of ``want``; constant windows exactly 0."""
    got, want = got[:, 0].astype(np.float64), want[:, 0].astype(np.float64)
    zmax = np.abs(want).max(axis=(1, 2))
    constant = sd == 0
    assert np.all(got[constant] == 0), f"constant windows must map to zeros {note}"
    assert np.all(want[constant] == 0)
    live = ~constant
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = 2 * (2 + zmax) * pixel_error / sd + 4 * F32 * (1 + zmax)
    diff = np.abs(got - want).max(axis=(1, 2))
    bad = live & (diff > tol)
    assert not bad.any(), (
        f"{bad.sum()} of {len(bad)} windows differ {note}: worst {diff[bad].max():.3g} "
        f"against a tolerance of {tol[bad][np.argmax(diff[bad])]:.3g}"
    )


# --- window mode: scale -----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float64", "uint16", "uint32"]),
    decade=st.integers(-12, 12),
    mantissa=st.floats(1.0, 9.99),
    flat_block=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(dtype="float64", decade=-10, mantissa=1.0, flat_block=True, seed=3)  # finding 3
def test_window_zscore_is_scale_invariant(dtype, decade, mantissa, flat_block, seed):
    rng = np.random.default_rng(seed)
    base = noise_frame(rng, (64, 72), dtype, flat_block)
    scale = mantissa * 10.0**decade
    # Integer frames scale into float64; float32 frames stay float32 (one more rounding).
    out_dtype = np.float32 if dtype == "float32" else np.float64
    scaled = (base.astype(np.float64) * scale).astype(out_dtype)
    want, sd, largest = window_stats(base)
    rounding = ROUNDING["float32"] + ROUNDING["float64"] if dtype == "float32" else 2.0**-53
    got = tile(scaled, PATCH, STRIDE, normalization=GRAY)
    assert_close_windows(got, tile(base, PATCH, STRIDE, normalization=GRAY), sd, rounding * largest)
    assert_close_windows(got, want, sd, rounding * largest, "(numpy, unscaled)")
    # The C++ tiler equals the numpy reference on the scaled frame itself.
    assert_close_windows(got, tile_numpy(scaled, PATCH, STRIDE, normalization=GRAY), sd, 0.0)


# --- window mode: offset -----------------------------------------------------------


def offset_pair(rng, source: str, decade: int, sign: int):
    """(frame, frame + offset, pixel error of the offset frame, exact?) for ``source``.

    Integer sources are offset exactly in their dtype (int64 frames, which the tiler does
    not take, are passed as float64: exact below 2**53); float sources round once.
    """
    offset = sign * 10.0**decade
    if source in ("uint16", "uint32"):
        base = noise_frame(rng, (64, 72), source, False)
        room = np.iinfo(source).max - int(base.max())
        shift = min(abs(int(offset)), room)
        return base, base + np.asarray(shift, source), 0.0, True
    if source == "int64":
        base = rng.integers(-(2**20), 2**20, size=(64, 72))
        return base.astype(np.float64), (base + int(offset)).astype(np.float64), 0.0, True
    spread = 10.0 ** rng.uniform(2, 6) if source == "float64" else 10.0 ** rng.uniform(0, 4)
    base = (rng.normal(size=(64, 72)) * spread).astype(source)
    if source == "float32":
        # A float32 offset beyond 1e3 x the contrast leaves only the offset's rounding.
        offset = sign * min(abs(offset), spread * 1e3)
    shifted = (base.astype(np.float64) + offset).astype(source)
    rounding = ROUNDING[source] + (2.0**-53 if source == "float32" else 0.0)
    return base, shifted, rounding * np.abs(shifted.astype(np.float64)).max(), False


@settings(max_examples=60, deadline=None)
@given(
    source=st.sampled_from(["uint16", "uint32", "int64", "float32", "float64"]),
    decade=st.integers(0, 12),
    sign=st.sampled_from([1, -1]),
    seed=st.integers(0, 2**16),
)
def test_window_zscore_is_offset_invariant(source, decade, sign, seed):
    rng = np.random.default_rng(seed)
    base, shifted, pixel_error, exact = offset_pair(rng, source, decade, sign)
    want, sd, _ = window_stats(base)
    got = tile(shifted, PATCH, STRIDE, normalization=GRAY)
    assert_close_windows(got, want, sd, pixel_error, f"({source} + {sign}e{decade})")
    assert_close_windows(
        tile_numpy(shifted, PATCH, STRIDE, normalization=GRAY), want, sd, pixel_error, "(numpy)"
    )
    if exact:
        # Deviations from a window's first pixel are exact, and scaling by a power of two
        # commutes with rounding: an exact offset changes no bit.
        np.testing.assert_array_equal(got, tile(base, PATCH, STRIDE, normalization=GRAY))


def test_int64_frames_are_refused_by_name():
    # The tiler takes no int64 (values past 2**53 would round): the error names it, and
    # the offset test above passes int64 frames as float64.
    with pytest.raises(TypeError, match="int64 is not supported"):
        tile(np.zeros((32, 32), np.int64), 16, 16)


# --- powers of two: the same bits ----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "exponents"),
    [("float32", [-100, -37, -1, 1, 40, 100]), ("float64", [-1000, -333, -1, 1, 333, 1000])],
)
def test_power_of_two_scales_give_identical_bits(dtype, exponents):
    # Windows and footprints are scaled by a power of two before their statistics, so
    # x2**k (as far as the dtype holds it without rounding) changes nothing: also values
    # near 1e-300 and 1e300, whose squares a double cannot hold.
    rng = np.random.default_rng(5)
    base = (rng.normal(size=(70, 90)) * 30 + 60).astype(dtype)
    base[10:40, 20:50] = 7.0  # exactly constant windows and footprints
    windows = tile(base, PATCH, STRIDE, normalization=GRAY)
    dense = normalize_region(base, box=PATCH)
    for k in exponents:
        scaled = base * np.asarray(2.0**k, dtype)
        assert np.all(np.isfinite(scaled)) and np.all(scaled[base != 0] != 0)
        np.testing.assert_array_equal(tile(scaled, PATCH, STRIDE, normalization=GRAY), windows)
        np.testing.assert_array_equal(normalize_region(scaled, box=PATCH), dense)


# --- constants ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("float64", 0.0),
        ("float64", 5e-324),
        ("float64", 1e-300),
        ("float64", 0.1),
        ("float64", 1 / 3),
        ("float64", 1e12 + 0.1),
        ("float64", 1e300),
        ("float64", -1.7e308),
        ("float32", 0.1),
        ("float32", 3e38),
        ("float32", 1e-40),
        ("uint16", 65535),
        ("uint32", 2**32 - 1),
        ("int32", -(2**31)),
    ],
)
def test_constant_frames_map_to_zeros_at_any_scale(dtype, value):
    frame = np.full((48, 40), value, dtype)
    np.testing.assert_array_equal(tile(frame, 16, 8), 0)
    np.testing.assert_array_equal(tile_numpy(frame, 16, 8), 0)
    np.testing.assert_array_equal(normalize_region(frame, box=16), 0)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(normalize_region_numpy(frame, box=16), 0)


@pytest.mark.parametrize("level", [1e-9, 1.0, 1e9])
def test_the_constant_rule_is_relative(level):
    # Contrast of 1e-14 of the mean is rounding, not signal: zeros. Contrast of 1e-9 of
    # the mean (a float32 frame can hold it) is signal: unit variance. At every level.
    rng = np.random.default_rng(6)
    noise = rng.normal(size=(48, 48))
    for relative, flat in [(1e-14, True), (1e-9, False)]:
        frame = level * (1 + relative * noise)
        windows = tile(frame, 16, 16, normalization=GRAY)
        for out in (windows, tile_numpy(frame, 16, 16, normalization=GRAY)):
            if flat:
                np.testing.assert_array_equal(out, 0)
            else:
                np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-3)
        dense = normalize_region(frame, box=16)
        assert np.all(dense == 0) if flat else dense.std() > 0.5


# --- the dense normalization -----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"]),
    box=st.sampled_from([2, 4, 6, 10, 16, 20]),
    height=st.integers(8, 48),
    width=st.integers(8, 48),
    corner=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    size=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    offset_decade=st.integers(0, 12),
    flat_block=st.booleans(),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
# The case, always tried: float64 + 1e12 (box sums lost every digit before).
@example(
    dtype="float64",
    box=16,
    height=40,
    width=40,
    corner=(0.1, 0.1),
    size=(0.8, 0.8),
    offset_decade=12,
    flat_block=True,
    threads=2,
    seed=1,
)
def test_normalize_region_is_the_centred_window_zscore(
    dtype, box, height, width, corner, size, offset_decade, flat_block, threads, seed
):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    if info is not None:
        # Contrast over a quarter of the range, offset as far as the dtype allows.
        span = (int(info.max) - int(info.min)) // 4
        room = int(info.max) - int(info.min) - span
        start = int(info.min) + min(10**offset_decade, room)
        frame = (start + rng.integers(0, span, (height, width), endpoint=True)).astype(dtype)
    else:
        spread = 1e3 if dtype == "float64" else 10.0
        offset = 10.0**offset_decade if dtype == "float64" else 10.0 ** min(offset_decade, 4)
        frame = (rng.normal(size=(height, width)) * spread + offset).astype(dtype)
    if flat_block:
        frame[: height // 2, : width // 2] = frame[0, 0]
    y0, x0 = int(corner[0] * (height - 1)), int(corner[1] * (width - 1))
    h = 1 + int(size[0] * (height - y0 - 1))
    w = 1 + int(size[1] * (width - x0 - 1))
    got = normalize_region(frame, origin=(y0, x0), shape=(h, w), box=box, threads=threads)
    assert got is not None and got.shape == (1, h, w)
    want, _ = box_reference(frame, (y0, x0), (h, w), box)
    tol = 8 * F32 * (1 + np.abs(want))
    np.testing.assert_array_less(np.abs(got[0] - want), tol + 1e-12)
    # The interior pixels against the C++ per-window z-score of the window centred there.
    half = box // 2
    rows, cols = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    inside = (rows >= half) & (cols >= half) & (rows - half + box <= height)
    inside &= cols - half + box <= width
    if inside.any():
        origins = np.stack([rows[inside] - half, cols[inside] - half], axis=1)
        windows = tile(frame, box, origins=origins, normalization=GRAY)[:, 0, half, half]
        np.testing.assert_array_less(
            np.abs(got[0][inside] - windows), 8 * F32 * (1 + np.abs(windows)) + 1e-12
        )


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32"])
def test_integer_dense_normalization_is_exact_across_regions_and_threads(dtype):
    # Exact integer sums: the region alone, any thread count, the whole frame: same bits.
    info = np.iinfo(dtype)
    frame = np.random.default_rng(7).integers(info.min, info.max, (90, 77), endpoint=True)
    frame = frame.astype(dtype)
    whole = normalize_region(frame, box=16, threads=1)
    for threads in (1, 2, 3):
        part = normalize_region(frame, origin=(13, 29), shape=(50, 40), box=16, threads=threads)
        np.testing.assert_array_equal(part, whole[:, 13:63, 29:69])


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["uint16", "uint32", "float32", "float64"]),
    decade=st.integers(-12, 12),
    offset_decade=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
@example(dtype="uint32", decade=-10, offset_decade=9, seed=4)  # findings 3 and 4
def test_normalize_region_is_scale_and_offset_invariant(dtype, decade, offset_decade, seed):
    rng = np.random.default_rng(seed)
    base = noise_frame(rng, (60, 70), dtype, True)
    dense = normalize_region(base, box=16)
    values = base.astype(np.float64)
    if dtype in ("uint16", "uint32"):
        room = int(np.iinfo(dtype).max) - int(base.max())
        shifted = base + np.asarray(min(10**offset_decade, room), dtype)
        # Exact integer sums: an offset changes no bit.
        np.testing.assert_array_equal(normalize_region(shifted, box=16), dense)
    # Scaled (and, for float frames, offset by up to 1e4 x the contrast) in the float dtype.
    out_dtype = np.float32 if dtype == "float32" else np.float64
    offset = 10.0 ** min(offset_decade, 5) if dtype.startswith("float") else 0.0
    moved = ((values + offset) * (1.7 * 10.0**decade)).astype(out_dtype)
    rounding = (2.0**-24 if out_dtype == np.float32 else 0.0) + 2.0**-52
    # Each pixel moved by at most rounding x the largest magnitude, in the base's units.
    error = rounding * (np.abs(values).max() + offset)
    got = normalize_region(moved, box=16)
    _, sd = box_reference(base, (0, 0), base.shape, 16)
    sd = np.ldexp(sd, np.frexp(np.abs(values).max())[1])  # back to the base's units
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = 2 * (2 + np.abs(dense[0])) * error / sd + 8 * F32 * (1 + np.abs(dense[0]))
    constant = sd == 0
    # Constant footprints: zeros, up to the rounding of float box sums (about 1e-8; the
    # exact integer sums give 0). The per-window path gives exact zeros.
    np.testing.assert_array_less(np.abs(got[0][constant]), 8 * F32)
    np.testing.assert_array_less(np.abs(dense[0][constant]), 8 * F32)
    if dtype.startswith("uint"):
        np.testing.assert_array_equal(dense[0][constant], 0)
    np.testing.assert_array_less(np.abs(got[0] - dense[0])[~constant], tol[~constant])
    # The C++ box sums against the numpy integral images on the moved frame itself.
    reference = normalize_region_numpy(moved, box=16)
    np.testing.assert_allclose(got, reference, atol=1e-5 * (1 + np.abs(reference).max()))


# --- the findings, as the issue measured them ----------------------------------------------


def agreement(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> float:
    """Share of windows (first axis) whose values agree within ``tol``."""
    return float(np.mean(np.abs(a - b).reshape(len(a), -1).max(axis=1) <= tol))


def test_frame_times_1e_minus_10_maps_like_the_frame():
    # Finding 3: a frame x1e-10 agreed with itself on 3.6 % of windows (absolute floor).
    rng = np.random.default_rng(8)
    frame = rng.normal(size=(256, 256)) * 0.05 + 0.5
    windows = tile(frame, 64, 16)
    assert agreement(tile(frame * 1e-10, 64, 16), windows) == 1.0
    assert agreement(tile((frame * 1e-10).astype(np.float32), 64, 16), windows) == 1.0
    dense = normalize_region(frame)
    assert agreement(normalize_region(frame * 1e-10)[0], dense[0]) == 1.0


def test_dense_normalization_ignores_a_large_offset():
    # Finding 4: a uint32 frame + 1e9 (or float64 + 1e9) agreed with the offset-free
    # dense map on 11 % of windows; window mode was exact.
    rng = np.random.default_rng(9)
    frame = rng.integers(0, 4096, (256, 256)).astype(np.uint32)
    dense = normalize_region(frame)
    np.testing.assert_array_equal(normalize_region(frame + np.uint32(10**9)), dense)
    shifted = frame.astype(np.float64) + 1e9
    assert agreement(normalize_region(shifted)[0], dense[0], tol=1e-5) == 1.0
    np.testing.assert_array_equal(tile(frame + np.uint32(10**9), 64, 32), tile(frame, 64, 32))


def test_finite_values_above_1e100_are_normalized():
    # Finding 13: finite frames above 1e100 were refused by the dense normalization, and
    # so reported as non-finite. Every finite value is taken now; None means non-finite.
    rng = np.random.default_rng(10)
    frame = rng.normal(size=(96, 96))
    huge = frame * 1e300
    got = normalize_region(huge)
    assert got is not None and np.isfinite(got).all()
    np.testing.assert_allclose(got, normalize_region(frame), atol=1e-5)
    np.testing.assert_allclose(tile(huge, 64, 16), tile(frame, 64, 16), atol=1e-5)
    mixed = frame.copy()
    mixed[40, 40] = 1.7e308
    assert normalize_region(mixed) is not None
    mixed[41, 41] = np.inf
    assert normalize_region(mixed) is None


def test_the_constant_rule_is_one_rule():
    # The numpy side reads the C++ extension's constants: one source for both.
    from defectscope.tiling import tiler

    assert tiler._STD_RELATIVE_FLOOR == _tiling.STD_RELATIVE_FLOOR == 1e-12
    assert tiler._STD_FLOOR == _tiling.STD_FLOOR == np.finfo(np.float64).tiny
    assert tiler.is_flat(np.array([0.0, 1e-13, 2e-12]), np.array([0.0, 1.0, 1.0])).tolist() == [
        True,
        True,
        False,
    ]
