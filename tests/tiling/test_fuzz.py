"""Fuzz of the C++ tiler's boundary: random shapes, strides, dtypes, byte orders, origins.

Frames come as contiguous, strided, reversed, transposed, broadcast (zero strides),
unaligned and packed-record views, in every dtype numpy has a buffer format for, in
both byte orders, with NaN and infinities; windows, regions, boxes and output buffers
are drawn valid and invalid. Every call must give the numpy reference's answer or raise
ValueError, TypeError or BufferError, predicted from the inputs. A few dozen examples
run in the normal suite; ``scripts/sanitize.sh`` runs many more
(``DEFECTSCOPE_FUZZ_EXAMPLES``) against the extension built with AddressSanitizer and
UndefinedBehaviorSanitizer, where any out-of-bounds access or undefined behaviour aborts.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from defectscope import _tiling
from defectscope.tiling.tiler import (
    Normalization,
    check_frame,
    normalize_region,
    normalize_region_numpy,
    tile,
    tile_numpy,
)
from tests.tiling.reference import box_reference

EXAMPLES = int(os.environ.get("DEFECTSCOPE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SUPPORTED = ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"]
UNSUPPORTED = ["int8", "int64", "uint64", "float16", "complex64", "bool"]
VIEWS = ["contiguous", "step", "reversed", "transpose", "broadcast", "unaligned", "record"]
ERRORS = (ValueError, TypeError, BufferError)


def values(rng: np.random.Generator, shape, dtype: np.dtype, magnitude: float, nonfinite: bool):
    """Random values of ``dtype``: integers over their whole range, floats at one scale."""
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    finfo = np.finfo(dtype)
    scale = min(magnitude, float(finfo.max) / 8)
    data = (rng.normal(size=shape) * scale).astype(dtype)
    if dtype.kind == "c":
        data = data + 1j * data
    if nonfinite and data.size:
        flat = data.reshape(-1)
        flat[rng.integers(0, flat.size, 2)] = [np.nan, np.inf]
    return data


@st.composite
def frames(draw):
    """A frame view, and its values as a native, contiguous array (or None if unusable)."""
    name = draw(st.sampled_from(SUPPORTED * 3 + UNSUPPORTED))
    order = draw(st.sampled_from(["=", "=", "<", ">"]))
    dtype = np.dtype(name).newbyteorder(order)
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    view = draw(st.sampled_from(VIEWS))
    magnitude = 10.0 ** draw(st.integers(-300, 300))
    nonfinite = draw(st.booleans()) and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = values(rng, (height, width), np.dtype(name), magnitude, nonfinite).astype(dtype)
    if view == "step":
        big = np.zeros((height * 2, width * 3), dtype)
        big[::2, ::3] = data
        frame = big[::2, ::3]
    elif view == "reversed":
        frame = np.ascontiguousarray(data[::-1, ::-1])[::-1, ::-1]
    elif view == "transpose":
        frame = np.ascontiguousarray(data.T).T
    elif view == "broadcast":
        data = np.broadcast_to(data[:1], (height, width))
        frame = data
    elif view == "unaligned":
        raw = bytearray(data.nbytes + 1)
        frame = np.frombuffer(raw, dtype, count=data.size, offset=1).reshape(height, width)
        frame.setflags(write=True)
        frame[...] = data
    elif view == "record":
        record = np.dtype([("tag", "u1"), ("value", dtype)], align=False)
        packed = np.zeros((height, width), record)
        packed["value"] = data
        frame = packed["value"]
    else:
        frame = data
    assert np.array_equal(frame, data, equal_nan=True)
    return frame, (name in SUPPORTED)


def native(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame.astype(frame.dtype.newbyteorder("=")))


def is_big_endian(frame: np.ndarray) -> bool:
    return frame.dtype.byteorder == ">" or (frame.dtype.byteorder == "=" and not _little())


def _little() -> bool:
    return np.little_endian


def normalization_for(draw, dtype: np.dtype) -> tuple[Normalization, float, float, bool]:
    """A normalization, its (low, high), and whether the range is valid."""
    mode = draw(st.sampled_from(["zscore", "zscore", "minmax", "imagenet"]))
    channels = 3 if mode == "imagenet" else draw(st.sampled_from([1, 3]))
    low = draw(st.sampled_from([0.0, -1.0, -1e6]))
    high = draw(st.sampled_from([1.0, 255.0, 1e6, low]))  # high == low: refused
    norm = Normalization(mode, value_range=(low, high), channels=channels)
    return norm, low, high, mode == "zscore" or high > low


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within float32 rounding of the statistics (NaN where NaN)."""
    finite = np.abs(want[np.isfinite(want)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + finite.max(initial=0.0)))


@FUZZ
@given(data=st.data(), frame_info=frames())
def test_tile_wrapper_matches_reference_or_refuses(data, frame_info):
    frame, supported = frame_info
    norm, _, _, valid_range = normalization_for(data.draw, frame.dtype)
    patch = data.draw(st.one_of(st.integers(1, min(frame.shape)), st.integers(-1, 44)))
    stride = (data.draw(st.integers(0, 9)), data.draw(st.integers(1, 9)))
    nan_policy = data.draw(st.sampled_from(["raise", "zero", "propagate"]))
    threads = data.draw(st.integers(0, 4))
    fits = 0 < patch <= min(frame.shape)
    valid = supported and fits and valid_range and stride[0] > 0
    event(f"valid={valid}")
    try:
        got = tile(frame, patch, stride, normalization=norm, nan_policy=nan_policy, threads=threads)
    except ERRORS as error:
        assert str(error), "errors must say what is wrong"
        if valid:  # the only other refusal: NaN with nan_policy='raise'
            assert nan_policy == "raise" and "NaN" in str(error), error
            assert not np.isfinite(native(frame).astype(np.float64)).all()
        return
    assert valid
    want = tile_numpy(native(frame), patch, stride, normalization=norm, nan_policy=nan_policy)
    close(got, want)


def out_buffer(shape, kind: str) -> np.ndarray:
    """A float32 output buffer of ``shape``, or one broken as ``kind`` says."""
    out = np.full(shape, -7, np.float32)
    if kind == "out_dtype":
        return out.astype(np.float64)
    if kind == "out_strided":
        return np.full((*shape[:-1], shape[-1] * 2), -7, np.float32)[..., ::2]
    if kind == "out_unaligned":
        raw = bytearray(out.nbytes + 2)
        out = np.frombuffer(raw, np.float32, out.size, 2).reshape(shape)
        out.setflags(write=True)
        out[...] = -7
    elif kind == "out_readonly":
        out.setflags(write=False)
    return out


TILE_FAULTS = ["none"] * 8 + [
    "patch",
    "origin",
    "out_short",
    "out_dtype",
    "out_strided",
    "out_unaligned",
    "out_readonly",
]


@FUZZ
@given(data=st.data(), frame_info=frames())
def test_tile_into_boundary(data, frame_info):
    # The extension itself, as any caller can reach it: no Python-side checks. One
    # argument at most is broken, so most calls get past the checks to the work.
    frame, supported = frame_info
    height, width = frame.shape
    fault = data.draw(st.sampled_from(TILE_FAULTS))
    if fault == "patch":
        patch = min(height, width) + data.draw(st.integers(1, 4))
    else:
        patch = data.draw(st.integers(1, min(height, width)))
    n = data.draw(st.integers(0 if fault != "origin" else 1, 6))
    rows = st.integers(0, max(height - patch, 0))
    cols = st.integers(0, max(width - patch, 0))
    origins = np.array([[data.draw(rows), data.draw(cols)] for _ in range(n)], np.int64)
    origins = origins.reshape(n, 2)
    if fault == "origin":
        limit = 2**63 - 1
        axis = data.draw(st.integers(0, 1))
        past = (height, width)[axis] - patch + 1  # the first corner whose window sticks out
        bad = data.draw(st.sampled_from([-1, past, limit, limit - patch + 1]))
        origins[data.draw(st.integers(0, n - 1)), axis] = bad
    layout = data.draw(st.sampled_from(["contiguous", "strided", "int32"]))
    if layout == "strided":
        origins = np.repeat(origins, 2, axis=1)[:, ::2]
    elif layout == "int32" and fault != "origin":
        origins = origins.astype(np.int32)
    norm, low, high, valid_range = normalization_for(data.draw, frame.dtype)
    rows_out = n + data.draw(st.integers(0, 2))
    if fault == "out_short":
        rows_out = n - 1 if n else -1
    out = out_buffer((max(rows_out, 0), norm.channels, patch, patch), fault)
    if fault == "out_strided" and out.flags.c_contiguous:
        fault = "none"  # steps along axes of length 1 (or none) leave a contiguous buffer
    nan_policy = data.draw(st.sampled_from(["raise", "zero", "propagate"]))
    # A 'short' buffer for no windows (rows_out -1 -> 0 rows) is still long enough.
    broken = fault != "none" and not (fault == "out_short" and n == 0)
    valid = supported and not is_big_endian(frame) and not broken and valid_range
    event(f"valid={valid}")
    try:
        count = _tiling.tile_into(
            frame, out, origins, patch, norm.mode, norm.channels, low, high, nan_policy, 2
        )
    except ERRORS as error:
        assert str(error)
        if valid:
            assert nan_policy == "raise" and "NaN" in str(error), error
        return
    assert valid and count == n
    if n:
        want = tile_numpy(
            native(frame), patch, origins=origins, normalization=norm, nan_policy=nan_policy
        )
        close(out[:n], want)
    assert np.all(out[n:] == -7), "rows past n must stay untouched"


REGION_FAULTS = ["none"] * 8 + [
    "box_odd",
    "box_small",
    "box_big",
    "region",
    "empty",
    "out_channels",
    "out_strided",
    "out_unaligned",
]


@FUZZ
@given(data=st.data(), frame_info=frames())
def test_normalize_region_boundary(data, frame_info):
    frame, supported = frame_info
    height, width = frame.shape
    fault = data.draw(st.sampled_from(REGION_FAULTS))
    boxes = {
        "box_odd": [1, 3, 7, 33],
        "box_small": [0, -2, -(2**31)],
        "box_big": [32770, 2**31 - 2],
    }.get(fault, [2, 4, 6, 16, 64, 32768])
    box = data.draw(st.sampled_from(boxes))
    y0, x0 = data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))
    h, w = data.draw(st.integers(1, height - y0)), data.draw(st.integers(1, width - x0))
    if fault == "region":
        y0, x0 = data.draw(
            st.sampled_from([(-1, x0), (y0, -1), (height - h + 1, x0), (2**63 - 5, x0)])
        )
    elif fault == "empty":
        h, w = data.draw(st.sampled_from([(0, w), (h, 0)]))
    norm, low, high, valid_range = normalization_for(data.draw, frame.dtype)
    channels = 3 if norm.mode == "imagenet" else 1
    shape = (2 if fault == "out_channels" else channels, h, w)
    out = out_buffer(shape, fault)
    if fault == "out_strided" and out.flags.c_contiguous:
        fault = "none"  # steps along axes of length 1 leave a contiguous buffer
    threads = data.draw(st.integers(0, 3))
    valid = supported and not is_big_endian(frame) and fault == "none" and valid_range
    event(f"valid={valid}")
    try:
        ok = _tiling.normalize_region_into(
            frame, out, y0, x0, box, norm.mode, channels, low, high, threads
        )
    except ERRORS as error:
        assert str(error) and not valid, error
        return
    assert valid
    values = native(frame).astype(np.float64)
    if norm.mode == "zscore":
        half = box // 2
        footprint = values[
            max(0, y0 - half) : min(height, y0 + h - 1 - half + box),
            max(0, x0 - half) : min(width, x0 + w - 1 - half + box),
        ]
    else:
        footprint = values[y0 : y0 + h, x0 : x0 + w]
    assert ok == bool(np.isfinite(footprint).all())
    if not ok:
        return
    if norm.mode == "zscore":
        want, _ = box_reference(native(frame), (y0, x0), (h, w), box)
        # Constant footprints of float frames come out within ~1e-8 of 0 (box sums).
        np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
    else:
        close(out, normalize_region_numpy(native(frame), norm, (y0, x0), (h, w), box))


@FUZZ
@given(data=st.data(), frame_info=frames())
def test_normalize_region_wrapper(data, frame_info):
    # The wrapper converts byte order and views; its answer is the native frame's.
    frame, supported = frame_info
    height, width = frame.shape
    y0, x0 = data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))
    h, w = data.draw(st.integers(1, height - y0)), data.draw(st.integers(1, width - x0))
    box = data.draw(st.sampled_from([2, 6, 16]))
    try:
        got = normalize_region(frame, "zscore", (y0, x0), (h, w), box)
    except ERRORS as error:
        assert not supported and "not supported" in str(error)
        return
    assert supported
    want = normalize_region(check_frame(native(frame)), "zscore", (y0, x0), (h, w), box)
    if want is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, want)
