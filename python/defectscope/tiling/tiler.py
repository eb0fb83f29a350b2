"""Strided patch tiling and normalization.

The work is done by the C++ extension :mod:`defectscope._tiling`, which reads the
frame in place (any strides, ``np.memmap`` included) and writes float32 NCHW
patches into a caller-provided buffer with the GIL released. :func:`tile_numpy`
is the plain numpy reference it is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from defectscope import _tiling

NormalizationMode = Literal["zscore", "minmax", "imagenet"]
NanPolicy = Literal["raise", "zero", "propagate"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_tiling.SUPPORTED_DTYPES)
# The z-score's constant rule, shared with the C++ extension (one source): a window whose
# standard deviation is at most _STD_RELATIVE_FLOOR (1e-12) times the magnitude of its mean
# is constant and maps to zeros. Relative, so a frame x1e-10 or + 1e9 normalizes like the
# frame itself; 1e-12 is above float64's rounding of the statistics and far below any
# contrast a float32 or integer frame can hold. _STD_FLOOR, the smallest normal float64,
# is an absolute floor only for true constants whose mean is 0 (all-zero windows): windows
# are scaled to magnitudes near 1 before their statistics, so no contrast comes near it.
_STD_RELATIVE_FLOOR = float(_tiling.STD_RELATIVE_FLOOR)
_STD_FLOOR = float(_tiling.STD_FLOOR)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How raw frame values become network inputs.

    Parameters
    ----------
    mode : {'zscore', 'minmax', 'imagenet'}
        ``zscore``: each patch minus its mean, divided by its standard deviation
        (flat patches, whose standard deviation is at most 1e-12 of their mean's
        magnitude, become zeros; see :func:`is_flat`). Invariant to the frame's scale
        and offset. ``minmax``: ``(x - low) / (high - low)`` with a
        fixed range. ``imagenet``: the fixed range first, then ImageNet's per-channel
        mean and standard deviation after gray is replicated into 3 channels.
    value_range : tuple of float, optional
        ``(low, high)`` for ``minmax`` and ``imagenet``. ``None`` means the full range
        of an integer dtype; float frames must give it.
    channels : {1, 3}
        Output channels; gray is replicated when 3.

    Notes
    -----
    Per-patch z-score is the default for STEM because absolute intensities drift
    with detector gain and dose between acquisitions, while the contrast inside a
    64-pixel window carries the defect signature.
    """

    mode: NormalizationMode = "zscore"
    value_range: tuple[float, float] | None = None
    channels: int = 3

    def resolve_range(self, dtype: np.dtype) -> tuple[float, float]:
        """Return ``(low, high)`` for a frame of ``dtype`` (unused by ``zscore``)."""
        if self.mode == "zscore":
            return 0.0, 1.0
        if self.value_range is not None:
            low, high = (float(v) for v in self.value_range)
            return low, high
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return float(info.min), float(info.max)
        raise ValueError(
            f"normalization {self.mode!r} needs value_range=(low, high) for a {dtype} frame"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        value_range = data.get("value_range")
        return cls(
            mode=data.get("mode", "zscore"),
            value_range=tuple(value_range) if value_range is not None else None,
            channels=int(data.get("channels", 3)),
        )


def window_origins(
    shape: Sequence[int], patch_size: int, stride: int | tuple[int, int], cover_edges: bool = True
) -> np.ndarray:
    """Top-left corners of the windows that tile a frame.

    Parameters
    ----------
    shape : sequence of int
        ``(height, width)`` of the frame.
    patch_size : int
        Side of the square window.
    stride : int or (int, int)
        Step between windows along rows and columns.
    cover_edges : bool
        Add a last row/column of windows flush with the bottom/right edge when the
        frame is not a multiple of the stride, so every pixel is covered.

    Returns
    -------
    origins : ndarray of int64, shape (n, 2)
        ``(row, col)`` in row-major order.

    Examples
    --------
    >>> window_origins((100, 64), 64, 32).tolist()
    [[0, 0], [32, 0], [36, 0]]
    """
    height, width = (int(v) for v in shape[:2])
    stride_y, stride_x = (stride, stride) if np.isscalar(stride) else stride
    if int(stride_y) <= 0 or int(stride_x) <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if patch_size <= 0:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if patch_size > height or patch_size > width:
        raise ValueError(f"patch size {patch_size} is larger than the frame {(height, width)}")

    def axis(length: int, step: int) -> np.ndarray:
        starts = np.arange(0, length - patch_size + 1, step, dtype=np.int64)
        if cover_edges and starts[-1] != length - patch_size:
            starts = np.append(starts, length - patch_size)
        return starts

    rows, cols = np.meshgrid(axis(height, int(stride_y)), axis(width, int(stride_x)), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def native_byte_order(array: np.ndarray) -> np.ndarray:
    """``array`` itself when its bytes are in this machine's order, else a converted copy.

    Big-endian frames come from FITS, some MRC and TIFF writers and ``np.dtype('>u2')``;
    they are converted rather than misread.
    """
    if array.dtype.byteorder in ("=", "|") or array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def check_frame(frame) -> np.ndarray:
    """``frame`` as a 2-D array of a supported dtype in native byte order, or an error."""
    frame = native_byte_order(np.asarray(frame))
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2-D, got shape {frame.shape}")
    if frame.dtype.name not in SUPPORTED_DTYPES:
        raise TypeError(
            f"frame dtype {frame.dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return frame


def check_origins(origins) -> np.ndarray:
    """Window corners as a C-contiguous int64 ``(n, 2)`` array, or an error.

    Only integer arrays are taken: float corners would be truncated, and a ``(2, n)``
    array reshaped into the wrong windows.
    """
    array = np.asarray(origins)
    if array.size == 0:
        return np.empty((0, 2), np.int64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"origins must have shape (n, 2), got {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"origins must be integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"origin {int(array.max())} is out of range")
    return np.ascontiguousarray(array, dtype=np.int64)


def tile(
    frame: np.ndarray,
    patch_size: int = 64,
    stride: int | tuple[int, int] = 16,
    *,
    origins: np.ndarray | None = None,
    normalization: Normalization | NormalizationMode = "zscore",
    out: np.ndarray | None = None,
    nan_policy: NanPolicy = "raise",
    threads: int = 0,
) -> np.ndarray:
    """Cut a frame into normalized float32 NCHW patches (C++, zero-copy).

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        uint8, uint16, int16, int32, uint32, float32 or float64, either byte order; any
        strides and alignment, read in place.
    patch_size : int
        Side of the square patch.
    stride : int or (int, int)
        Window step; ignored when ``origins`` is given.
    origins : ndarray of int, shape (n, 2), optional
        Explicit ``(row, col)`` window corners.
    normalization : Normalization or str
        See :class:`Normalization`; a string selects the mode with 3 channels.
    out : ndarray of float32, shape (>= n, C, patch, patch), optional
        C-contiguous buffer to fill; allocated when ``None``.
    nan_policy : {'raise', 'zero', 'propagate'}
        Non-finite pixels raise, become 0 after normalization (statistics from the
        finite pixels), or propagate.
    threads : int
        Worker threads; 0 uses every core.

    Returns
    -------
    patches : ndarray of float32, shape (n, C, patch, patch)
        A view of ``out`` when given.

    Examples
    --------
    >>> frame = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    >>> tile(frame, 64, 32).shape
    (9, 3, 64, 64)
    """
    frame = check_frame(frame)
    norm = Normalization(mode=normalization) if isinstance(normalization, str) else normalization
    if origins is None:
        origins = window_origins(frame.shape, patch_size, stride)
    else:
        origins = check_origins(origins)
    low, high = norm.resolve_range(frame.dtype)
    if out is None:
        out = np.empty((len(origins), norm.channels, patch_size, patch_size), dtype=np.float32)
    n = _tiling.tile_into(
        frame, out, origins, patch_size, norm.mode, norm.channels, low, high, nan_policy, threads
    )
    return out[:n]


def is_flat(sd: Any, level: Any) -> Any:
    """True where a window (or dense footprint) counts as constant: it maps to zeros.

    Parameters
    ----------
    sd : array
        Standard deviations.
    level : array
        The means, in the same units (offset included).

    Returns
    -------
    array of bool
        ``sd <= 1e-12 * |level|`` or ``sd <=`` the smallest normal float64 (see
        ``_STD_RELATIVE_FLOOR``). Written with operators only, so numpy arrays and torch
        tensors both work; the C++ extension applies the same rule.
    """
    return (sd <= _STD_RELATIVE_FLOOR * abs(level)) | (sd <= _STD_FLOOR)


def _scaled_and_shifted(patches: np.ndarray, finite: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(n, P, P)`` as the z-score's statistics see them, and their references.

    Each window is scaled by a power of two (exact) so that its largest finite magnitude
    lies in [0.5, 1), then shifted by its first finite pixel: the C++ tiler's steps, so a
    frame x2**k gives the same bits and an offset does not cancel precision.
    """
    n = len(patches)
    largest = np.where(finite, np.abs(patches), 0.0).reshape(n, -1).max(axis=1, initial=0.0)
    _, exponent = np.frexp(largest)
    patches = np.ldexp(patches, -exponent[:, None, None])
    flat_finite = finite.reshape(n, -1)
    first = np.argmax(flat_finite, axis=1)
    reference = patches.reshape(n, -1)[np.arange(n), first]
    reference = np.where(flat_finite.any(axis=1), reference, 0.0)[:, None, None]
    return patches - reference, reference


def tile_numpy(
    frame: np.ndarray,
    patch_size: int = 64,
    stride: int | tuple[int, int] = 16,
    *,
    origins: np.ndarray | None = None,
    normalization: Normalization | NormalizationMode = "zscore",
    nan_policy: NanPolicy = "raise",
) -> np.ndarray:
    """Numpy reference for :func:`tile` (same arguments, same result).

    Built from ``sliding_window_view`` and vectorized statistics; it is the
    independent reference for the C++ path's tests and benchmarks.
    """
    frame = check_frame(frame)
    norm = Normalization(mode=normalization) if isinstance(normalization, str) else normalization
    origins = window_origins(frame.shape, patch_size, stride) if origins is None else origins
    origins = check_origins(origins)
    views = np.lib.stride_tricks.sliding_window_view(frame, (patch_size, patch_size))
    patches = views[origins[:, 0], origins[:, 1]].astype(np.float64)
    finite = np.isfinite(patches)
    bad = ~finite.all(axis=(1, 2))
    if nan_policy == "raise" and bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"window {first} at origin {tuple(origins[first])} contains NaN")
    if norm.mode == "zscore":
        with np.errstate(invalid="ignore"):  # inf - inf where nan_policy lets them through
            patches, reference = _scaled_and_shifted(patches, finite)
        if nan_policy == "zero":
            count = finite.sum(axis=(1, 2), keepdims=True)
            clean = np.where(finite, patches, 0.0)
            mean = clean.sum(axis=(1, 2), keepdims=True) / np.maximum(count, 1)
            var = (np.where(finite, patches - mean, 0.0) ** 2).sum(
                axis=(1, 2), keepdims=True
            ) / np.maximum(count, 1)
        else:
            mean = patches.mean(axis=(1, 2), keepdims=True)
            var = patches.var(axis=(1, 2), keepdims=True)
        sd = np.sqrt(var)
        flat = is_flat(sd, reference + mean)
        with np.errstate(invalid="ignore"):
            result = np.where(flat, 0.0, (patches - mean) / np.where(flat, 1.0, sd))
        result = np.repeat(result[:, None], norm.channels, axis=1)
    else:
        low, high = norm.resolve_range(frame.dtype)
        result = (patches - low) / (high - low)
        result = np.repeat(result[:, None], norm.channels, axis=1)
        if norm.mode == "imagenet":
            result = (result - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[
                None, :, None, None
            ]
    if nan_policy == "zero":
        result = np.where(finite[:, None], result, 0.0)
    return result.astype(np.float32)


def dense_channels(normalization: Normalization) -> int:
    """Input channels of a dense pass: gray once, except ImageNet's per-channel shift."""
    return 3 if normalization.mode == "imagenet" else 1


def normalize_region(
    frame: np.ndarray,
    normalization: Normalization | NormalizationMode = "zscore",
    origin: tuple[int, int] = (0, 0),
    shape: tuple[int, int] | None = None,
    box: int = 64,
    out: np.ndarray | None = None,
    threads: int = 1,
) -> np.ndarray | None:
    """Frame-consistent normalization of one region, the input of a dense pass (C++).

    A dense pass cannot z-score each window by its own statistics, so ``zscore``
    z-scores each pixel by the mean and standard deviation of the ``box`` x ``box``
    footprint around it (rows ``y - box/2 .. y + box/2 - 1``, clipped at the frame's
    edges): the statistics of the window centred on it, with the same constant rule
    (:func:`is_flat`). ``minmax`` and ``imagenet`` are per-pixel maps already and stay as
    they are. Statistics always come from the whole frame, so a region normalized alone
    equals the same pixels of the frame normalized at once.

    Integer frames are summed exactly (64- and 128-bit integers): the result does not
    depend on an offset (a uint32 frame + 1e9 gives the same bits), on the region or on
    ``threads``. Float frames are scaled by a power of two and shifted by the median of a
    sample of the footprint before the box sums, so neither their scale (1e-300 ... 1e300)
    nor an offset costs precision; there a region alone agrees with the whole frame to
    float rounding.

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        Any supported dtype, strides and byte order; read in place.
    normalization : Normalization or str
    origin, shape : (int, int)
        The region's top-left pixel and size; the whole frame by default.
    box : int
        Side of the statistics footprint: the patch size, so that a pixel sees the
        contrast a window would.
    out : ndarray of float32, shape (C, h, w), optional
        C is 1, or 3 for ``imagenet`` (see :func:`dense_channels`).
    threads : int
        Worker threads; 0 uses every core.

    Returns
    -------
    ndarray of float32, shape (C, h, w), or None
        ``None`` when the footprint holds a non-finite value (NaN or infinity), which the
        per-window path handles (its ``nan_policy``). Every finite value is taken.
    """
    frame = check_frame(frame)
    norm = Normalization(mode=normalization) if isinstance(normalization, str) else normalization
    low, high = norm.resolve_range(frame.dtype)
    height, width = shape if shape is not None else frame.shape
    channels = dense_channels(norm)
    if out is None:
        out = np.empty((channels, int(height), int(width)), np.float32)
    ok = _tiling.normalize_region_into(
        frame,
        out,
        int(origin[0]),
        int(origin[1]),
        int(box),
        norm.mode,
        channels,
        low,
        high,
        threads,
    )
    return out if ok else None


def normalize_region_numpy(
    frame: np.ndarray,
    normalization: Normalization | NormalizationMode = "zscore",
    origin: tuple[int, int] = (0, 0),
    shape: tuple[int, int] | None = None,
    box: int = 64,
) -> np.ndarray | None:
    """Numpy reference for :func:`normalize_region` (integral images, float64).

    Written independently of the C++ box sums: the whole frame is scaled by a power of two
    and shifted by its median, then per-pixel box statistics come from integral images.
    Returns None when the frame (not only the footprint) holds a non-finite value.
    """
    frame = check_frame(frame)
    norm = Normalization(mode=normalization) if isinstance(normalization, str) else normalization
    values = frame.astype(np.float64)
    height, width = shape if shape is not None else frame.shape
    y0, x0 = origin
    if norm.mode != "zscore":
        low, high = norm.resolve_range(frame.dtype)
        region = values[y0 : y0 + height, x0 : x0 + width]
        if not np.isfinite(region).all():
            return None
        gray = (region - low) / (high - low)
        if norm.mode == "imagenet":
            return (
                (gray[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
            ).astype(np.float32)
        return gray[None].astype(np.float32)
    if not np.isfinite(values).all():
        return None  # the reference looks at the whole frame: callers pass finite frames
    _, exponent = np.frexp(np.abs(values).max())
    values = np.ldexp(values, -exponent)
    reference = float(np.median(values))
    values = values - reference

    def integral(a: np.ndarray) -> np.ndarray:
        return np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    s1, s2 = integral(values), integral(values * values)
    rows = np.arange(y0, y0 + height)
    cols = np.arange(x0, x0 + width)
    top = np.clip(rows - box // 2, 0, frame.shape[0])[:, None]
    bottom = np.clip(rows - box // 2 + box, 0, frame.shape[0])[:, None]
    left = np.clip(cols - box // 2, 0, frame.shape[1])[None, :]
    right = np.clip(cols - box // 2 + box, 0, frame.shape[1])[None, :]

    def box_sum(s: np.ndarray) -> np.ndarray:
        return s[bottom, right] - s[top, right] - s[bottom, left] + s[top, left]

    count = (bottom - top) * (right - left)
    mean = box_sum(s1) / count
    sd = np.sqrt(np.maximum(box_sum(s2) / count - mean * mean, 0.0))
    region = values[y0 : y0 + height, x0 : x0 + width]
    flat = is_flat(sd, reference + mean)
    result = np.where(flat, 0.0, (region - mean) / np.where(flat, 1.0, sd))
    return result[None].astype(np.float32)


def patches_to_inputs(
    images: np.ndarray, normalization: Normalization, threads: int = 0
) -> np.ndarray:
    """Normalize a stack of patches (n, P, P) into NCHW network inputs.

    The stack is seen as one tall frame with a window at each patch, so the same
    C++ tiler feeds training and inference and the two cannot drift apart.
    """
    n, height, width = images.shape
    if height != width:
        raise ValueError(f"patches must be square, got {height}x{width}")
    frame = np.ascontiguousarray(images).reshape(n * height, width)
    origins = np.stack([np.arange(n) * height, np.zeros(n, dtype=np.int64)], axis=1)
    return tile(frame, height, origins=origins, normalization=normalization, threads=threads)
