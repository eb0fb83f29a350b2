"""The C++ tiler against the numpy reference, and its error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defectscope import _tiling
from defectscope.tiling.tiler import (
    Normalization,
    normalize_region,
    tile,
    tile_numpy,
    window_origins,
)

DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"]


def random_frame(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(2**20)), min(info.max, 2**20)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    return (rng.normal(size=shape) * 50 + 10).astype(dtype)


def norm_for(mode: str, dtype: str, channels: int) -> Normalization:
    value_range = None if np.dtype(dtype).kind in "ui" else (-200.0, 300.0)
    if mode == "imagenet":
        channels = 3
    return Normalization(mode=mode, value_range=value_range, channels=channels)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(["zscore", "minmax", "imagenet"]),
    channels=st.sampled_from([1, 3]),
    height=st.integers(8, 70),
    width=st.integers(8, 70),
    patch=st.integers(2, 24),
    stride_y=st.integers(1, 20),
    stride_x=st.integers(1, 20),
    view=st.sampled_from(["contiguous", "step", "transpose", "flip", "fortran"]),
    seed=st.integers(0, 2**16),
)
def test_matches_numpy_reference(
    dtype, mode, channels, height, width, patch, stride_y, stride_x, view, seed
):
    rng = np.random.default_rng(seed)
    base = random_frame(rng, (height * 2, width * 2), dtype)
    frame = {
        "contiguous": base[:height, :width],
        "step": base[::2, ::2],
        "transpose": base[:width, :height].T,
        "flip": base[:height, :width][::-1, ::-1],
        "fortran": np.asfortranarray(base[:height, :width]),
    }[view]
    if patch > min(frame.shape):
        patch = min(frame.shape)
    norm = norm_for(mode, dtype, channels)
    got = tile(frame, patch, (stride_y, stride_x), normalization=norm, threads=3)
    want = tile_numpy(frame, patch, (stride_y, stride_x), normalization=norm)
    assert got.shape == want.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), patch=st.integers(4, 16))
def test_explicit_origins(seed, n, patch):
    rng = np.random.default_rng(seed)
    frame = random_frame(rng, (40, 50), "float32")
    origins = np.stack(
        [rng.integers(0, 40 - patch + 1, n), rng.integers(0, 50 - patch + 1, n)], axis=1
    )
    got = tile(frame, patch, origins=origins, normalization="zscore")
    want = tile_numpy(frame, patch, origins=origins, normalization="zscore")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["zscore", "minmax"])
def test_nan_zero_policy(mode):
    rng = np.random.default_rng(1)
    frame = random_frame(rng, (40, 40), "float64")
    frame[5, 7] = np.nan
    frame[30, 2] = np.inf
    norm = Normalization(mode=mode, value_range=(-200, 300))
    got = tile(frame, 16, 8, normalization=norm, nan_policy="zero")
    want = tile_numpy(frame, 16, 8, normalization=norm, nan_policy="zero")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_nan_raise_and_propagate():
    frame = np.ones((32, 32), np.float32)
    frame[20, 20] = np.nan
    with pytest.raises(ValueError, match=r"origin \(16, 16\).*NaN"):
        tile(frame, 16, 16)
    out = tile(frame, 16, 16, nan_policy="propagate")
    assert np.isfinite(out[0]).all() and np.isnan(out[3]).all()


def test_zscore_statistics_and_flat_patch():
    rng = np.random.default_rng(2)
    frame = random_frame(rng, (64, 64), "uint16")
    frame[:32, :32] = 7  # a flat window must give zeros, not NaN
    out = tile(frame, 32, 32, normalization=Normalization("zscore", channels=1))
    assert np.all(out[0] == 0)
    np.testing.assert_allclose(out[1:].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out[1:].std(axis=(1, 2, 3)), 1, atol=1e-4)


def test_imagenet_channels_differ():
    frame = np.full((64, 64), 128, np.uint8)
    out = tile(frame, 64, 64, normalization="imagenet")
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)


def test_memmap_frame_and_preallocated_buffer(tmp_path):
    path = tmp_path / "frame.u16"
    mm = np.memmap(path, dtype=np.uint16, mode="w+", shape=(300, 260))
    mm[:] = np.random.default_rng(3).integers(0, 65535, mm.shape, dtype=np.uint16)
    mm.flush()
    ro = np.memmap(path, dtype=np.uint16, mode="r", shape=(300, 260))
    origins = window_origins(ro.shape, 64, 32)
    buffer = np.full((len(origins) + 5, 3, 64, 64), -7, np.float32)
    got = tile(ro, 64, origins=origins, out=buffer)
    assert np.shares_memory(got, buffer)
    assert np.all(buffer[len(origins) :] == -7)  # rows past n stay untouched
    np.testing.assert_allclose(got, tile_numpy(np.asarray(ro), 64, 32), rtol=1e-6, atol=1e-6)


def test_window_origins_cover_edges():
    origins = window_origins((100, 70), 64, 32)
    assert origins[:, 0].max() == 36 and origins[:, 1].max() == 6
    assert sorted(set(origins[:, 0].tolist())) == [0, 32, 36]
    exact = window_origins((100, 70), 64, 32, cover_edges=False)
    assert sorted(set(exact[:, 0].tolist())) == [0, 32]


def _call(frame, out, origins, patch=8, mode="zscore", channels=3, lo=0.0, hi=1.0, nan="raise"):
    return _tiling.tile_into(frame, out, origins, patch, mode, channels, lo, hi, nan, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"frame": np.zeros((2, 16, 16), np.float32)}, ValueError, "must be 2-D"),
        ({"frame": np.zeros((16, 16), np.complex64)}, TypeError, "not supported"),
        ({"frame": np.zeros((16, 16), np.int64)}, TypeError, "not supported"),
        ({"patch": 32}, ValueError, "larger than the frame"),
        ({"patch": 0}, ValueError, "must be positive"),
        ({"out": np.zeros((1, 3, 8, 8), np.float32)}, ValueError, "out must have shape"),
        ({"out": np.zeros((4, 3, 8, 8), np.float64)}, TypeError, "float32"),
        ({"out": np.zeros((4, 3, 8, 8), np.float32)[:, :, :, ::-1]}, ValueError, "C-contiguous"),
        ({"origins": np.array([[0, 10]])}, ValueError, r"origin \(0, 10\).*does not fit"),
        ({"origins": np.array([[-1, 0]])}, ValueError, "does not fit"),
        ({"mode": "median"}, ValueError, "normalization must be"),
        ({"mode": "imagenet", "channels": 1}, ValueError, "channels must be 3"),
        ({"channels": 2, "out": np.zeros((4, 2, 8, 8), np.float32)}, ValueError, "1 or 3"),
        ({"mode": "minmax", "lo": 1.0, "hi": 1.0}, ValueError, "high > low"),
        ({"nan": "ignore"}, ValueError, "nan_policy must be"),
    ],
)
def test_misuse_raises_clear_errors(kwargs, error, message):
    args = {
        "frame": np.zeros((16, 16), np.float32),
        "out": np.zeros((4, 3, 8, 8), np.float32),
        "origins": np.array([[0, 0], [8, 8]]),
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        _call(**args)


def test_read_only_output_rejected():
    out = np.zeros((4, 3, 8, 8), np.float32)
    out.setflags(write=False)
    with pytest.raises((ValueError, BufferError, TypeError)):
        _call(np.zeros((16, 16), np.float32), out, np.array([[0, 0]]))


def test_python_wrapper_errors():
    with pytest.raises(ValueError, match="stride must be positive"):
        tile(np.zeros((64, 64), np.uint8), 16, 0)
    with pytest.raises(ValueError, match="needs value_range"):
        tile(np.zeros((64, 64), np.float32), 16, 16, normalization="minmax")
    with pytest.raises(ValueError, match="2-D"):
        tile(np.zeros((64, 64, 3), np.uint8), 16, 16)


@pytest.mark.parametrize(
    "origins",
    [[[2**63 - 10, 0]], [[0, 2**63 - 1]], [[2**62, 2**62]], [[-1, 0]], [[0, 65]]],
)
def test_origins_near_int64_limits_are_refused(origins):
    # origin + patch overflows int64 here; a wrong check reads before the frame or crashes.
    frame = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    with pytest.raises(ValueError, match="does not fit in the frame"):
        tile(frame, 64, origins=origins)
    out = np.empty((1, 3, 64, 64), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        _tiling.tile_into(
            frame, out, np.asarray(origins, np.int64), 64, "zscore", 3, 0, 1, "raise", 0
        )


@pytest.mark.parametrize(
    ("origins", "error", "message"),
    [
        (np.zeros((2, 5), np.int64), ValueError, r"shape \(n, 2\), got \(2, 5\)"),
        (np.zeros(4, np.int64), ValueError, r"shape \(n, 2\)"),
        (np.array([[1.5, 0.0]]), TypeError, "must be integers"),
        (np.array([[2**64 - 1, 0]], np.uint64), ValueError, "out of range"),
    ],
)
def test_origins_are_not_reshaped_or_truncated(origins, error, message):
    frame = np.zeros((128, 128), np.float32)
    with pytest.raises(error, match=message):
        tile(frame, 64, origins=origins)
    with pytest.raises(error, match=message):
        tile_numpy(frame, 64, origins=origins)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "uint32", "float32", "float64"])
def test_big_endian_frames_read_as_their_values(dtype):
    native = random_frame(np.random.default_rng(3), (80, 96), dtype)
    swapped = native.astype(native.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(tile(swapped, 32, 16), tile(native, 32, 16))
    # The extension itself names the byte order instead of calling the format unsupported.
    out = np.empty((1, 3, 32, 32), np.float32)
    with pytest.raises(TypeError, match="big-endian"):
        _tiling.tile_into(
            swapped, out, np.zeros((1, 2), np.int64), 32, "zscore", 3, 0, 1, "raise", 0
        )


@pytest.mark.parametrize("magnitude", [1e150, 1e305, 1.7e308])
def test_zscore_of_huge_finite_values_does_not_overflow(magnitude):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(96, 96))
    frame = base / np.abs(base).max() * magnitude
    got = tile(frame, 64, 16)
    assert np.isfinite(got).all()
    # Scale invariance: the same as the moderate frame, and as the numpy reference.
    np.testing.assert_allclose(got, tile(base, 64, 16), atol=2e-5)
    np.testing.assert_allclose(got, tile_numpy(frame, 64, 16), atol=2e-5)


def test_value_range_whose_width_overflows_is_refused():
    frame = np.zeros((64, 64))
    norm = Normalization(mode="minmax", value_range=(-1e308, 1e308))
    with pytest.raises(ValueError, match="value range"):
        tile(frame, 64, 64, normalization=norm)


THREAD_LIMIT_SCRIPT = """
import resource, numpy as np
from defectscope import tile
frame = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)
want = tile(frame, 64, 8, threads=1)
out = np.empty_like(want)
# Leave too little address space for 64 thread stacks: some std::thread starts fail.
usage = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (usage + 40 * 2**20, resource.RLIM_INFINITY))
got = tile(frame, 64, 8, threads=64, out=out)
print(all(np.array_equal(got[i], want[i]) for i in range(len(want))))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_threads_the_system_refuses_do_not_abort():
    # Before: 'terminate called without an active exception' and SIGABRT.
    run = subprocess.run(
        [sys.executable, "-c", THREAD_LIMIT_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "True"


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32", "float64"])
def test_unaligned_frames_are_read_and_unaligned_outputs_refused(tmp_path, dtype):
    # A raw file with a 1-byte header maps unaligned: read through memcpy loads (a
    # misaligned T* load is undefined behaviour, which the sanitizer job reports).
    native = random_frame(np.random.default_rng(11), (70, 90), dtype)
    path = tmp_path / "frame.raw"
    path.write_bytes(b"\0" + native.tobytes())
    mapped = np.memmap(path, dtype, mode="r", offset=1, shape=native.shape)
    assert not mapped.flags.aligned
    np.testing.assert_array_equal(tile(mapped, 32, 16), tile(native, 32, 16))
    np.testing.assert_array_equal(
        normalize_region(mapped, box=16), normalize_region(native, box=16)
    )
    origins = window_origins(native.shape, 32, 16)
    raw = bytearray(len(origins) * 3 * 32 * 32 * 4 + 1)
    out = np.frombuffer(raw, np.float32, offset=1).reshape(len(origins), 3, 32, 32)
    with pytest.raises(ValueError, match="out must be aligned"):
        tile(native, 32, 16, out=out)
    region = np.frombuffer(bytearray(70 * 90 * 4 + 2), np.float32, offset=2).reshape(1, 70, 90)
    with pytest.raises(ValueError, match="out must be aligned"):
        normalize_region(native, box=16, out=region)


def test_normalize_region_names_its_argument_errors():
    frame = np.zeros((40, 40), np.uint16)
    out = np.empty((1, 40, 40), np.float32)
    with pytest.raises(TypeError, match="big-endian"):
        _tiling.normalize_region_into(frame.astype(">u2"), out, 0, 0, 16, "zscore", 1, 0, 1, 1)
    with pytest.raises(TypeError, match="is not supported in native byte order"):
        _tiling.normalize_region_into(frame.astype(np.int64), out, 0, 0, 16, "zscore", 1, 0, 1, 1)
    for box in (0, 7, 32770):
        with pytest.raises(ValueError, match="box must be an even size from 2 to 32768"):
            _tiling.normalize_region_into(frame, out, 0, 0, box, "zscore", 1, 0, 1, 1)
