"""What is left of a window once its own perfect lattice is taken away.

A microscopist's test for "something is off here" is the residual against the ideal
lattice: a column missing, added, moved or of another intensity stays in it, the
lattice does not. Each window's ideal lattice is rebuilt from its own Bragg peaks
(the local maxima of its Fourier transform that stand far above its median
amplitude, harmonics included, each with its four nearest bins for slow strain), so
no reference frame or unit cell has to be known. The residual is then summarised in
numbers that do not change when the window is shifted, rotated by 90 degrees or
flipped, because a point defect of one kind may sit anywhere in a window and the
lattice may be turned:

- at three smoothing scales (none, 1 and 2 px), the two strongest local maxima and
  the two deepest minima of the residual, in units of its robust noise level (how
  much intensity was added or is missing, and over what size), and the ideal
  lattice's value at each of those places (on a column, or between columns);
- the radially averaged power spectrum of the residual (log), which says whether
  what is left is a point, a line, or noise.

A density fitted on patches centred on their defects (simulated ones) takes the
extremes in the window's centre (``centre``): a window beside a defect then holds the
lattice at its centre, as a ``Bulk`` patch cut beside a defect does, and the defect is
judged by the windows centred on it.

A Gaussian density of these descriptors over the training patches of the known
classes (:func:`defectscope.artifacts.density.fit_density`, the same machinery as
the embedding's) then says how unlike every known class a window's residual is:
a strong residual that no known class explains is new.

NumPy and SciPy (threadpoolctl holds BLAS to one thread meanwhile), so every runtime
can compute it.
"""

from __future__ import annotations

import functools
import numbers
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from defectscope.util.blas import one_blas_thread

# A Fourier local maximum this many times the window's median Fourier amplitude is a
# Bragg peak of the ideal lattice (harmonics included: sharp columns need them).
PEAK_FACTOR = 10.0
# Peaks closer than this to DC (in Fourier bins) are the window's slow background.
MIN_PEAK_RADIUS = 2.0
# Smoothing scales (pixels) the residual's extremes are taken at.
SCALES = (0.0, 1.0, 2.0)
# Extremes taken per sign and scale.
EXTREMES = 2
# Pixels at the border left out of the extremes: the Fourier filter wraps around.
BORDER = 4
# Side of the central square (share of the window's side) the extremes are taken in
# when a density is fitted on patches centred on their defects (simulated ones): a
# window then describes what lies at its centre, not a defect at its edge, which is
# another window's centre at any stride up to that side (24 px of a 64 px window).
CENTRE_SHARE = 0.375
# Side (pixels) of the neighbourhood an extreme blanks before the next is taken.
EXTREME_SIZE = 5
# Threads a batch of windows is split over (each window is computed on its own, so
# the descriptors do not depend on it), and the fewest windows worth a thread.
THREADS = 2
MIN_WINDOWS_PER_THREAD = 64


def _as_windows(windows: np.ndarray) -> np.ndarray:
    """The checked windows, z-scored, as float32 (n, H, W)."""
    return _zscore(_checked_windows(windows))


def _checked_windows(windows: np.ndarray) -> np.ndarray:
    batch = np.asarray(windows)
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3:
        raise ValueError(
            f"windows must be (n, height, width) or one (height, width), got {batch.shape}"
        )
    if batch.dtype.kind not in "uif":
        raise ValueError(f"windows must be numbers, got dtype {batch.dtype}")
    height, width = batch.shape[1:]
    if min(height, width) < 2 * BORDER + EXTREME_SIZE:
        raise ValueError(
            f"windows of {height} x {width} px are too small for a lattice residual "
            f"(at least {2 * BORDER + EXTREME_SIZE} px a side)"
        )
    if not np.isfinite(batch).all():
        raise ValueError("windows hold NaN or infinite pixels")
    return batch


def _zscore(batch: np.ndarray) -> np.ndarray:
    n = len(batch)
    flat = batch.reshape(n, -1)
    # Sums in float64 (a 64 x 64 sum in float32 loses digits).
    mean = flat.mean(axis=1, keepdims=True, dtype=np.float64)
    if batch.dtype.itemsize <= 2 or batch.dtype == np.float32:
        # Exact in float32 already: centred there, with no float64 copy of the batch.
        # The mean's float32 rounding is taken off as well, or a large offset over a
        # small spread (counts of 30000 +- 3) would leave a mean of rounding / spread.
        rounded = mean.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below
            centred = np.subtract(flat, rounded, dtype=np.float32)
            centred -= (mean - rounded).astype(np.float32)
            variance = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)[:, None]
        variance /= flat.shape[1]
        if np.isfinite(variance).all():
            centred *= _inverse_deviation(variance).astype(np.float32)
            return centred.reshape(batch.shape)
    # Wider numbers (float64, int32 and up), and float32 spreads past float32's range
    # (the centred pixels overflowed): centred and scaled in float64 before rounding.
    wide = flat - mean
    wide *= _inverse_deviation(np.square(wide).mean(axis=1, keepdims=True))
    return wide.astype(np.float32).reshape(batch.shape)


def _inverse_deviation(variance: np.ndarray) -> np.ndarray:
    std = np.sqrt(variance)
    # A flat window has no lattice; it stays all zeros rather than dividing by 0.
    return 1.0 / np.where(std > 0, std, 1.0)


def _check_factor(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"peak_factor must be a number > 1, got {value!r}")
    if not np.isfinite(value) or value <= 1:
        raise ValueError(f"peak_factor must be a finite number > 1, got {value!r}")
    return float(value)


def _radius(height: int, width: int) -> np.ndarray:
    fy = np.fft.fftfreq(height)[:, None] * height
    fx = np.fft.fftfreq(width)[None, :] * width
    # In bins of the shorter side, so a non-square window's rings stay rings.
    return np.hypot(fy * min(height, width) / height, fx * min(height, width) / width)


def lattice_reference(windows: np.ndarray, peak_factor: float = PEAK_FACTOR) -> np.ndarray:
    """Each window's ideal lattice: its strongest Fourier peaks, transformed back.

    Parameters
    ----------
    windows : ndarray, shape (n, H, W) or (H, W)
        Raw windows; each is z-scored (zero mean, unit deviation) first.
    peak_factor : float
        Local maxima of ``|F|`` (beyond :data:`MIN_PEAK_RADIUS` bins from DC)
        above this many times the window's median ``|F|`` are its Bragg peaks; each
        is kept with its four nearest bins, and DC with them.

    Returns
    -------
    ndarray of float64, shape (n, H, W)
        The reference of each z-scored window.

    Raises
    ------
    ValueError
        For a batch of the wrong shape or dtype, non-finite pixels, windows too
        small to hold a residual, or a ``peak_factor`` that is not a number > 1.
    """
    peak_factor = _check_factor(peak_factor)
    batch = _as_windows(windows)
    return _reference(batch, peak_factor, workers=THREADS).astype(np.float64)


@functools.lru_cache(maxsize=16)
def _half_plane_layout(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the whole plane's bins live in an ``rfft2`` half (cached per window shape).

    Returns the half's "beyond DC" mask, and the flat half-plane indices of the whole
    plane's even-even bins beyond DC (a column past the half reads its Hermitian mirror,
    ``(-y, W - x)``, exactly as the whole plane would be built from the half).
    """
    columns = width // 2 + 1
    beyond = _radius(height, width) >= MIN_PEAK_RADIUS
    y, x = np.nonzero(beyond[::2, ::2])
    y, x = 2 * y, 2 * x
    mirrored = x >= columns
    y = np.where(mirrored, (-y) % height, y)
    x = np.where(mirrored, width - x, x)
    floor_bins = y * columns + x
    beyond_half = np.ascontiguousarray(beyond[:, :columns])
    for array in (beyond_half, floor_bins):
        array.flags.writeable = False  # shared between calls
    return beyond_half, floor_bins


def _row_median(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=1)`` of finite rows, by one partition (``np.median``
    also partitions for a NaN check the finite windows do not need)."""
    middle = values.shape[1] // 2
    if values.shape[1] % 2:
        return np.partition(values, middle, axis=1)[:, middle]
    part = np.partition(values, (middle - 1, middle), axis=1)
    return (part[:, middle - 1] + part[:, middle]) / values.dtype.type(2)


def _whole_plane_at(amplitude: np.ndarray, k, y, x, width: int) -> np.ndarray:
    """``|F|`` of the whole plane at bins ``(k, y, x)``, read from its ``rfft2`` half."""
    height, columns = amplitude.shape[1:]
    mirrored = x >= columns
    return amplitude[k, np.where(mirrored, (-y) % height, y), np.where(mirrored, width - x, x)]


def _reference(batch: np.ndarray, peak_factor: float, workers: int = 1) -> np.ndarray:
    from scipy import fft

    n, height, width = batch.shape
    # A real window's spectrum is Hermitian: only the rfft2 half is computed and
    # searched. The peaks are those of the whole plane (a bin past the half is its
    # mirror's), so a peak on the half's edge still sees all its neighbours.
    spectrum = fft.rfft2(batch, axes=(1, 2), workers=workers)
    amplitude = np.abs(spectrum)
    columns = amplitude.shape[2]
    beyond, floor_bins = _half_plane_layout(height, width)
    # A Bragg peak stands far above the window's typical Fourier amplitude; a point
    # defect spreads its few columns' worth of intensity thinly over every bin.
    # The median is over the bins of even frequency along both axes: a quarter of the
    # work, and a set of bins that turns and flips of the window map onto itself.
    floor = _row_median(amplitude.reshape(n, -1)[:, floor_bins])[:, None, None]
    k, y, x = np.nonzero(beyond[None] & (amplitude > peak_factor * floor))
    # The whole plane's bins past the half: the mirrors of columns 1 .. W - columns.
    twin = (x >= 1) & (x <= width - columns)
    k = np.concatenate([k, k[twin]])
    y = np.concatenate([y, (-y[twin]) % height])
    x = np.concatenate([x, width - x[twin]])
    # Of those few bins, the local maxima of |F| (3 x 3, wrapping): checked bin by bin.
    level = _whole_plane_at(amplitude, k, y, x, width)
    local = np.ones(len(k), dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                neighbour = _whole_plane_at(
                    amplitude, k, (y + dy) % height, (x + dx) % width, width
                )
                local &= level >= neighbour
    k, y, x = k[local], y[local], x[local]
    # The peaks and their four nearest bins, on the half (the mask is as symmetric as
    # the amplitude, so the half's part of it is all the inverse transform needs).
    mask = np.zeros(amplitude.shape, dtype=bool)
    for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        xx = (x + dx) % width
        inside = xx < columns
        mask[k[inside], (y[inside] + dy) % height, xx[inside]] = True
    mask[:, 0, 0] = True
    return fft.irfft2(spectrum * mask, s=(height, width), axes=(1, 2), workers=workers)


@functools.lru_cache(maxsize=16)
def _smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    """``gaussian_filter1d`` (reflecting border) along an axis of ``size`` as a matrix:
    column j is the filter's response to a pixel at j, so a batch is smoothed by two
    matrix products, far faster than the filter's loops on small windows."""
    from scipy.ndimage import gaussian_filter1d

    matrix = gaussian_filter1d(np.eye(size), sigma, axis=0, mode="reflect").astype(np.float32)
    matrix.flags.writeable = False  # shared between calls
    return matrix


def _smooth(batch: np.ndarray, sigma: float) -> np.ndarray:
    """``gaussian_filter(batch, (0, sigma, sigma))`` for a float32 (n, H, W) batch."""
    n, height, width = batch.shape
    along_x = (batch.reshape(n * height, width) @ _smoothing_matrix(width, sigma).T).reshape(
        n, height, width
    )
    return np.matmul(_smoothing_matrix(height, sigma), along_x)


@functools.lru_cache(maxsize=16)
def _blanking_offsets(padded_width: int) -> np.ndarray:
    """Flat offsets of an extreme's ``EXTREME_SIZE``-square neighbourhood in a row of
    ``padded_width``."""
    reach = EXTREME_SIZE // 2
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    offsets = (dy * padded_width + dx).ravel()
    offsets.flags.writeable = False  # shared between calls
    return offsets


def check_centre(centre: float | None) -> float | None:
    """``centre`` as a float in (0, 1], or None; ValueError names anything else."""
    if centre is None:
        return None
    try:  # numbers only: float() would also take "0.3", b"0.3" and True
        number = isinstance(centre, numbers.Real) and not isinstance(centre, bool | np.bool_)
        value = float(centre) if number else float("nan")
    except (OverflowError, TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"centre must be a share of the window in (0, 1], got {centre!r}")
    return value


def _borders(height: int, width: int, centre: float | None) -> tuple[int, int]:
    """Rows and columns left out of the extremes on each side: ``BORDER``, or all
    outside the central square of ``centre`` times the side (``EXTREME_SIZE`` at
    least)."""
    if centre is None:
        return BORDER, BORDER

    def border(side: int) -> int:
        inner = max(round(centre * side), EXTREME_SIZE)
        return max(BORDER, (side - inner) // 2)

    return border(height), border(width)


def _extremes(
    residual: np.ndarray,
    reference: np.ndarray,
    noise: np.ndarray,
    sign: float = 1.0,
    borders: tuple[int, int] = (BORDER, BORDER),
) -> np.ndarray:
    """The ``EXTREMES`` strongest maxima of ``sign * residual`` inside ``borders`` (rows,
    columns left out on each side), each at least ``EXTREME_SIZE // 2 + 1`` px (max
    norm) from the ones before, in ``noise`` units, and the reference at each:
    (n, 2 * EXTREMES), strongest first."""
    n, height, width = residual.shape
    reach = EXTREME_SIZE // 2
    border_y, border_x = borders
    inner_h, inner_w = height - 2 * border_y, width - 2 * border_x
    # The inside of each window in a frame of -inf as wide as the blanking reaches, so
    # an extreme's neighbourhood is blanked by one set of flat offsets, never clipped.
    padded_w = inner_w + 2 * reach
    values = np.full((n, inner_h + 2 * reach, padded_w), -np.inf, dtype=np.float32)
    inside = residual[:, border_y : height - border_y, border_x : width - border_x]
    np.multiply(
        inside, np.float32(sign), out=values[:, reach : reach + inner_h, reach : reach + inner_w]
    )
    flat = values.reshape(n, -1)
    rows = np.arange(n)[:, None]
    offsets = _blanking_offsets(padded_w)
    found, places = [], []
    for _ in range(EXTREMES):  # argmax passes: far cheaper than local-maximum filters
        best = np.argmax(flat, axis=1)
        found.append(flat[rows[:, 0], best])
        y, x = np.divmod(best, padded_w)
        places.append((y - reach + border_y) * width + (x - reach + border_x))
        # Blank the neighbourhood (clipped only for a window with nothing left, whose
        # argmax is a -inf corner of the frame).
        flat[rows, np.clip(best[:, None] + offsets, 0, flat.shape[1] - 1)] = -np.inf
    value = np.stack(found, axis=1)
    at_reference = reference.reshape(n, -1)[rows, np.stack(places, axis=1)]
    missing = ~np.isfinite(value)  # nothing left away from the border (tiny windows)
    value[missing] = 0.0
    at_reference[missing] = 0.0
    return np.concatenate([value / noise, at_reference], axis=1)


@functools.lru_cache(maxsize=16)
def _ring_average(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The window's taper and the (half-plane pixels, rings) matrix of ring means: the
    power of a real window is symmetric, so each ``rfft2`` column that stands for two
    counts twice and the half plane gives the whole plane's ring means."""
    taper = np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)
    columns = width // 2 + 1
    rings = np.rint(_radius(height, width)[:, :columns]).astype(np.int64).ravel()
    weight = np.where(np.arange(columns) < width - np.arange(columns), 2.0, 1.0)
    weight[0] = 1.0
    bins = min(height, width) // 2
    average = np.zeros((height * columns, bins), dtype=np.float32)
    inside = np.flatnonzero((rings >= 1) & (rings <= bins))
    average[inside, rings[inside] - 1] = np.broadcast_to(weight, (height, columns)).ravel()[inside]
    average /= np.maximum(average.sum(axis=0), 1.0)
    taper.flags.writeable = average.flags.writeable = False  # shared between calls
    return taper, average


def _radial_power(residual: np.ndarray) -> np.ndarray:
    from scipy import fft

    taper, average = _ring_average(*residual.shape[1:])
    power = np.abs(fft.rfft2(residual * taper, axes=(1, 2))) ** 2
    # Ring means as one product with the averaging matrix.
    means = power.reshape(len(power), -1) @ average
    return np.log(means.astype(np.float64) + 1e-6)


def residual_descriptors(
    windows: np.ndarray, peak_factor: float = PEAK_FACTOR, centre: float | None = None
) -> np.ndarray:
    """Rotation- and flip-invariant numbers describing each window's residual, and
    shift-invariant too (within the central square, with ``centre``).

    Parameters
    ----------
    windows : ndarray, shape (n, H, W) or (H, W)
        Raw windows (any gain and offset: each is z-scored first).
    peak_factor : float
        Bragg peak threshold of the ideal lattice (:func:`lattice_reference`).
    centre : float, optional
        Take the extremes in the window's central square of this share of its side
        (``CENTRE_SHARE`` for densities fitted on patches centred on their defects),
        so that they describe what lies at the window's centre; shifts then keep the
        numbers only within that square. Default: the whole window but ``BORDER`` px.

    Returns
    -------
    ndarray of float32, shape (n, d)
        ``d = 4 * EXTREMES * len(SCALES) + min(H, W) // 2``: per scale the strongest
        maxima and minima of the residual over its noise level and the reference at
        each, then the log radial power spectrum of the residual.

    Raises
    ------
    ValueError
        As :func:`lattice_reference`, or for a ``centre`` outside (0, 1].
    """
    peak_factor = _check_factor(peak_factor)
    centre = check_centre(centre)
    batch = _checked_windows(windows)
    count = max(1, min(THREADS, len(batch) // MIN_WINDOWS_PER_THREAD))
    with one_blas_thread():
        if count == 1:
            return _descriptors(batch, peak_factor, centre)
        parts = np.array_split(batch, count)
        with ThreadPoolExecutor(count) as pool:
            done = list(pool.map(_descriptors, parts, [peak_factor] * count, [centre] * count))
    return np.concatenate(done)


def _descriptors(windows: np.ndarray, peak_factor: float, centre: float | None) -> np.ndarray:
    batch = _zscore(windows)
    reference = _reference(batch, peak_factor)
    residual = batch - reference
    n = residual.shape[0]
    borders = _borders(*residual.shape[1:], centre)
    parts = []
    for sigma in SCALES:
        smooth = _smooth(residual, sigma) if sigma else residual
        # Noise level: the mean absolute deviation (times sqrt(pi / 2), sigma for
        # Gaussian noise). A defect's few pixels move it by a few per cent; unlike a
        # median on a sub-grid it does not change when the window is turned.
        flat = smooth.reshape(n, -1)
        spread = np.abs(flat - flat.mean(axis=1, keepdims=True))
        noise = np.float32(np.sqrt(np.pi / 2)) * spread.mean(axis=1, keepdims=True)
        noise = np.where(noise > 0, noise, np.float32(1.0))
        added = _extremes(smooth, reference, noise, borders=borders)
        missing = _extremes(smooth, reference, noise, sign=-1.0, borders=borders)
        parts += [added[:, :EXTREMES], missing[:, :EXTREMES], added[:, EXTREMES:]]
        parts.append(missing[:, EXTREMES:])
    parts.append(_radial_power(residual))
    return np.concatenate(parts, axis=1).astype(np.float32)


def descriptor_size(height: int, width: int) -> int:
    """Length of :func:`residual_descriptors`' rows for windows of ``height x width``."""
    return 4 * EXTREMES * len(SCALES) + min(height, width) // 2
