"""STEM-appropriate augmentation of raw gray patches (before normalization).

A crystal lattice seen down a zone axis keeps its defect class under the
square's symmetries (90-degree rotations, flips) and under small shifts: those
are the geometric transforms, with a contrast power (gamma) and Gaussian noise.

The physical transforms (:attr:`Augmentation.physical`, on by default) imitate
what changes between microscope sessions and what resampling a frame to the
model's scale does not remove: the dose (Poisson noise), scan-line jitter and
slow drift, probe blur, column contrast (each column's intensity raised to a
power, as a change of the Z exponent does), detector gain and offset, a
small scale jitter, and (opt-in) the sampling of a recording at another magnification
(the shot noise drawn on a coarser or finer pixel grid, then resampled back to
the model's as the runtime's scale match does). Large scale changes stay out:
the runtime matches each frame's scale to the model's first (calibration or the
measured lattice period), so the network only has to cover that match's
residual error (a few per cent), and lattice spacings that identify defects
are not blurred into each other.
Every physical transform is about the patch centre, so a centred defect stays
centred. Each draws from a range stored here, so ``model.json`` (through
``dataclasses.asdict`` of the training configuration) records what the model was
trained to tolerate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from defectscope.tiling.lattice import SCALE_RANGE

# numpy's Poisson sampler refuses means past about 9.2e18; doses far below that.
MAX_DOSE = 1e12
# Scale jitter covers the residual of the runtime's scale match, not a change of
# magnification; a wider range would blur lattice spacings that identify defects.
MAX_SCALE_JITTER = (0.8, 1.25)
# Recording grids the sampling transform may draw: the runtime's sane range of scale
# factors, beyond which a frame is mapped unscaled.
MAX_SAMPLING = SCALE_RANGE
# Largest blur sigma / jitter sigma / drift in pixels: beyond, a 64-pixel patch is
# no longer a recording of the same lattice.
MAX_PIXELS = 8.0

# Column contrast scales each pixel by its column's relative height to ``power - 1``;
# below this share of the brightest column (vacuum, the gaps between columns) the
# factor stops growing, so noise there is not amplified without bound.
CONTRAST_FLOOR = 0.02

# Fields that hold (low, high) ranges and how each is checked: the kind of value
# ("positive" factors, "nonnegative" sizes, "any" signed values) and an upper limit.
_RANGES: dict[str, tuple[str, tuple[float, float] | None]] = {
    "gamma_range": ("positive", None),
    "scale_range": ("positive", MAX_SCALE_JITTER),
    "contrast_range": ("positive", None),
    "blur_range": ("nonnegative", (0.0, MAX_PIXELS)),
    "jitter_range": ("nonnegative", (0.0, MAX_PIXELS)),
    "drift_range": ("any", (-MAX_PIXELS, MAX_PIXELS)),
    "dose_range": ("positive", (0.0, MAX_DOSE)),
    "gain_range": ("positive", None),
    "offset_range": ("any", None),
    "sampling_range": ("positive", MAX_SAMPLING),
}
_PROBABILITIES = (
    "physical_probability",
    "scale_probability",
    "contrast_probability",
    "blur_probability",
    "jitter_probability",
    "drift_probability",
    "dose_probability",
    "gain_probability",
    "sampling_probability",
)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Augmentation.{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"Augmentation.{name} must be finite, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Strengths of each random transform; ``Augmentation.off()`` disables all.

    Ranges are ``(low, high)``; factors (scale, contrast, dose, gain) are drawn
    log-uniformly (a factor and its inverse equally likely), the others uniformly.
    Each physical transform applies to a patch with its own probability, and only
    to the ``physical_probability`` share of patches, so clean patches stay in
    every batch.

    Attributes
    ----------
    rotate_flip, max_shift, gamma_range, noise_std
        Geometric transforms: a random 90-degree rotation and flip, a shift of up
        to ``max_shift`` pixels (reflected at the border), a contrast power on the
        patch scaled to 0..1 and Gaussian noise relative to the patch's standard
        deviation (applied last, as read noise, when ``physical`` is on).
    physical : bool
        The one switch for every physical transform below.
    physical_probability : float
        Share of patches that get any physical transform.
    scale_range : (float, float)
        Zoom about the patch centre (reflect padding): the residual error of the
        runtime's scale match.
    contrast_range : (float, float)
        Power ``p`` of each column's height: ratios of column intensities change
        as ``(I_a / I_b) ** p``, as a change of the Z exponent (``Z ** n`` to
        ``Z ** (n p)``) does, while every column keeps its shape.
    column_radius : float
        Radius, in pixels, of the neighbourhood whose maximum is taken as a
        pixel's column height (about one column's visible half-width).
    blur_range : (float, float)
        Gaussian probe blur, sigma in pixels.
    jitter_range : (float, float)
        Sigma, in pixels, of each scan line's shift along x (the shifts are normal).
    drift_range : (float, float)
        Slow drift: total shift along x (shear) and extra rows along y (stretch)
        across the patch, in pixels, drawn separately.
    dose_range : (float, float)
        Electrons at the brightest column; Poisson noise at that dose.
    gain_range, offset_range : (float, float)
        Detector gain (a factor) and offset (a share of the patch's intensity range).
    sampling_range : (float, float)
        The recording's pixels per lattice spacing relative to the training patches'
        (below 1: a coarser grid, a lower magnification): the patch is resampled to
        that grid, gets its shot noise there, and is resampled back
        (:func:`defectscope.tiling.resample.resample_frame` both ways, as the
        runtime's scale match does), so noise correlated over a resampled pixel and
        the detail a coarser grid loses are seen in training. Off by default
        (``sampling_probability`` 0).
    """

    rotate_flip: bool = True
    max_shift: int = 4
    gamma_range: tuple[float, float] = (0.75, 1.33)
    noise_std: float = 0.08
    physical: bool = True
    # 1 in 5 patches stays as recorded, so nominal frames lose nothing.
    physical_probability: float = 0.8
    # The runtime's scale match (calibration or lattice period) is good to a few %.
    scale_range: tuple[float, float] = (0.96, 1.04)
    scale_probability: float = 0.5
    # Column contrast +-20 % (the goal), symmetric in log: 0.8 .. 1 / 0.8.
    contrast_range: tuple[float, float] = (0.8, 1.25)
    contrast_probability: float = 0.5
    # Columns are ~1.5 px sigma at the scale patches are recorded at; 3 px reaches a
    # column's peak from its visible edge without reaching the next column's.
    column_radius: float = 3.0
    # A probe up to about one column width wider than nominal (columns ~1.5 px).
    blur_range: tuple[float, float] = (0.3, 1.0)
    blur_probability: float = 0.5
    # Jitter adds in quadrature to the recording's own: twice a nominal 0.3 px
    # needs 0.52 px more; 0.8 px covers twice up to 0.46 px nominal.
    jitter_range: tuple[float, float] = (0.1, 0.8)
    jitter_probability: float = 0.5
    # Drift of a few px per 512-px frame is ~0.5 px per patch; 1.5 px leaves room.
    drift_range: tuple[float, float] = (-1.5, 1.5)
    drift_probability: float = 0.5
    # Shot noise adds to the recording's own (1/D = 1/D0 + 1/D'): a third of the
    # dose D0 needs D' = D0 / 2, i.e. 30-100 e for nominal 60-200 e; 20 e covers
    # a third of 60 with margin, 1000 e is nearly clean. Drawn log-uniformly.
    dose_range: tuple[float, float] = (20.0, 1000.0)
    dose_probability: float = 0.6
    # Gain and offset matter for minmax/imagenet normalization (z-score removes them).
    gain_range: tuple[float, float] = (0.8, 1.25)
    offset_range: tuple[float, float] = (-0.1, 0.1)
    gain_probability: float = 0.5
    # Magnification +-15 % (the goal), symmetric in log: 0.85 .. 1 / 0.85.
    sampling_range: tuple[float, float] = (0.85, 1.18)
    # Off by default (opt in with 0.5): it helped the synthetic shifted frames, but a toy
    # fixture model's density then flagged 12.5 % of held-out known patches (goal 10 %).
    sampling_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotate_flip", "physical"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"Augmentation.{name} must be true or false, got {value!r}")
            object.__setattr__(self, name, bool(value))
        shift = self.max_shift
        if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 0:
            raise ValueError(f"Augmentation.max_shift must be an integer >= 0, got {shift!r}")
        object.__setattr__(self, "max_shift", int(shift))
        radius = _as_float("column_radius", self.column_radius)
        if not 1 <= radius <= MAX_PIXELS:
            raise ValueError(
                f"Augmentation.column_radius must be in [1, {MAX_PIXELS:g}] pixels, got {radius}"
            )
        object.__setattr__(self, "column_radius", radius)
        noise = _as_float("noise_std", self.noise_std)
        if noise < 0:
            raise ValueError(f"Augmentation.noise_std must be >= 0, got {noise}")
        object.__setattr__(self, "noise_std", noise)
        for name in _PROBABILITIES:
            p = _as_float(name, getattr(self, name))
            if not 0 <= p <= 1:
                raise ValueError(f"Augmentation.{name} must be in [0, 1], got {p}")
            object.__setattr__(self, name, p)
        for name, (kind, limits) in _RANGES.items():
            object.__setattr__(self, name, _check_range(name, getattr(self, name), kind, limits))

    @classmethod
    def off(cls) -> Augmentation:
        """No transform at all: patches come back as float32 copies."""
        return cls(
            rotate_flip=False, max_shift=0, gamma_range=(1.0, 1.0), noise_std=0.0, physical=False
        )


def _check_range(
    name: str, value: Any, kind: str, limits: tuple[float, float] | None
) -> tuple[float, float]:
    """``value`` as a ``(low, high)`` tuple of floats; ``ValueError`` naming ``name``."""
    try:
        pair = tuple(value)
    except TypeError:
        raise ValueError(f"Augmentation.{name} must be (low, high), got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"Augmentation.{name} must be (low, high), got {value!r}")
    low, high = (_as_float(name, v) for v in pair)
    if low > high:
        raise ValueError(f"Augmentation.{name}: low {low} is above high {high}")
    if kind == "positive" and low <= 0:
        raise ValueError(f"Augmentation.{name} must be positive, got {pair}")
    if kind == "nonnegative" and low < 0:
        raise ValueError(f"Augmentation.{name} must be >= 0, got {pair}")
    if limits is not None and (low < limits[0] or high > limits[1]):
        raise ValueError(f"Augmentation.{name} {pair} is outside [{limits[0]:g}, {limits[1]:g}]")
    return low, high


@dataclasses.dataclass(frozen=True)
class PhysicalDraws:
    """The physical transforms drawn for a batch of ``n`` patches of ``height`` rows.

    Patches a transform skips hold its neutral value: scale, contrast, gain and
    sampling 1, blur, row shifts, drift and offset 0, dose infinite (no shot noise).

    Attributes
    ----------
    scale, contrast, blur, dose, gain, offset, sampling : ndarray, shape (n,)
    row_shift : ndarray, shape (n, height)
        Each scan line's shift along x, pixels (content moves right when positive).
    drift : ndarray, shape (n, 2)
        ``(y, x)``: extra rows (stretch) and x shift (shear) across the patch, pixels.
    """

    scale: np.ndarray
    contrast: np.ndarray
    blur: np.ndarray
    row_shift: np.ndarray
    drift: np.ndarray
    dose: np.ndarray
    gain: np.ndarray
    offset: np.ndarray
    sampling: np.ndarray


def draw_physical(
    n: int, height: int, rng: np.random.Generator, config: Augmentation = Augmentation()
) -> PhysicalDraws:
    """Draw the physical transforms for ``n`` patches of ``height`` rows.

    Parameters
    ----------
    n, height : int
    rng : numpy.random.Generator
    config : Augmentation
        Its ranges and probabilities; with ``physical`` off every draw is neutral
        and ``rng`` is not used.

    Returns
    -------
    PhysicalDraws
    """
    if not config.physical:
        ones, zeros = np.ones(n), np.zeros(n)
        return PhysicalDraws(
            ones, ones.copy(), zeros, np.zeros((n, height)), np.zeros((n, 2)),
            np.full(n, np.inf), ones.copy(), zeros.copy(), ones.copy(),
        )  # fmt: skip
    on = rng.random(n) < config.physical_probability

    def pick(probability: float) -> np.ndarray:
        return on & (rng.random(n) < probability)

    def uniform(bounds: tuple[float, float], size: Any = None) -> np.ndarray:
        return rng.uniform(bounds[0], bounds[1], size=n if size is None else size)

    def log_uniform(bounds: tuple[float, float]) -> np.ndarray:
        # Clipped: exp(log(x)) may miss x by an ulp, and a range of one value is exact.
        return np.clip(np.exp(uniform((math.log(bounds[0]), math.log(bounds[1])))), *bounds)

    def chosen(probability: float, values: np.ndarray, neutral: float) -> np.ndarray:
        mask = pick(probability)
        return np.where(mask.reshape((n,) + (1,) * (values.ndim - 1)), values, neutral)

    scale = chosen(config.scale_probability, log_uniform(config.scale_range), 1.0)
    contrast = chosen(config.contrast_probability, log_uniform(config.contrast_range), 1.0)
    blur = chosen(config.blur_probability, uniform(config.blur_range), 0.0)
    sigma = chosen(config.jitter_probability, uniform(config.jitter_range), 0.0)
    row_shift = rng.standard_normal((n, height)) * sigma[:, None]
    drift = chosen(config.drift_probability, uniform(config.drift_range, (n, 2)), 0.0)
    dose = chosen(config.dose_probability, log_uniform(config.dose_range), np.inf)
    gain_on = pick(config.gain_probability)
    gain = np.where(gain_on, log_uniform(config.gain_range), 1.0)
    offset = np.where(gain_on, uniform(config.offset_range), 0.0)
    # Drawn last, so this batch's other fields are those a configuration without it draws
    # (the draws after this call, and so later batches, differ).
    if config.sampling_probability > 0:
        sampling = chosen(config.sampling_probability, log_uniform(config.sampling_range), 1.0)
    else:  # no draws at all: the random stream is the one before this transform existed
        sampling = np.ones(n)
    return PhysicalDraws(scale, contrast, blur, row_shift, drift, dose, gain, offset, sampling)


def _gaussian_blur(batch: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of each patch with its own sigma (px), reflect padding.

    The kernels are those of ``scipy.ndimage.gaussian_filter`` (truncate 4, radius
    ``int(4 * sigma + 0.5)``, half-sample reflection), applied to all patches at once.
    """
    radii = (4.0 * sigma + 0.5).astype(int)
    reach = int(radii.max())
    taps = np.arange(-reach, reach + 1, dtype=np.float64)
    kernels = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    kernels[np.abs(taps)[None, :] > radii[:, None]] = 0.0
    kernels = (kernels / kernels.sum(axis=1, keepdims=True)).astype(np.float32)
    out = batch
    for axis in (2, 1):
        size = out.shape[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (reach, reach)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        for t in range(2 * reach + 1):
            window = padded[:, t : t + size, :] if axis == 1 else padded[:, :, t : t + size]
            acc += kernels[:, t, None, None] * window
        out = acc
    return out


def _column_contrast(batch: np.ndarray, power: np.ndarray, radius: float) -> np.ndarray:
    """Raise each column's height to ``power`` (per patch) and keep its shape.

    A pixel's column height is the largest intensity above the patch's 1st
    percentile within ``radius``; the pixel is scaled by that height, relative to
    the patch's brightest, to ``power - 1``. A column of height ``h`` then peaks at
    ``h ** power`` (relative), and its profile is scaled, not reshaped, which a
    power of the pixels would do (it narrows or widens every column).
    """
    from scipy.ndimage import grey_dilation

    lo = np.percentile(batch, 1.0, axis=(1, 2), keepdims=True).astype(np.float32)
    above = batch - lo
    signal = np.clip(above, 0.0, None)
    r = int(radius)
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= radius
    height = grey_dilation(signal, footprint=disk[None], mode="reflect")
    top = height.max(axis=(1, 2), keepdims=True)
    top = np.where(top > 0, top, np.float32(1.0))  # a flat patch has no columns to change
    level = np.maximum(height / top, np.float32(CONTRAST_FLOOR))
    exponent = (power.astype(np.float32) - 1.0)[:, None, None]
    # The darkest 1 % (below the reference level) is left as recorded, not flattened.
    return (np.where(above > 0, signal * level**exponent, above) + lo).astype(np.float32)


def apply_physical(
    patches: np.ndarray,
    draws: PhysicalDraws,
    rng: np.random.Generator,
    column_radius: float = Augmentation.column_radius,
) -> np.ndarray:
    """Apply drawn physical transforms to float patches (n, H, W); float32 result.

    In the order a recording happens: column contrast on the clean image (each
    column's height to a power, its shape kept), then
    probe blur, then where the scan reads (scale, drift, jitter: one linear
    resampling about the centre, reflect padding), then shot noise at the dose
    (intensity above the patch's 1st percentile mapped to counts, the brightest
    pixel at ``dose``) on the recording's pixel grid (``sampling``: resampled to it
    and back), then detector gain and offset.

    Parameters
    ----------
    patches : ndarray, shape (n, H, W)
    draws : PhysicalDraws
        From :func:`draw_physical` for ``n`` patches of ``H`` rows.
    rng : numpy.random.Generator
        Draws the shot-noise counts.
    column_radius : float
        Pixels around a pixel searched for its column's height
        (:attr:`Augmentation.column_radius`).

    Returns
    -------
    ndarray of float32, shape (n, H, W)

    Raises
    ------
    ValueError
        When ``patches`` is not 3-D or ``draws`` are for another batch shape.
    """
    from scipy.ndimage import map_coordinates

    batch = np.array(patches, dtype=np.float32)
    if batch.ndim != 3:
        raise ValueError(f"patches must be (n, height, width), got shape {batch.shape}")
    height, width = batch.shape[1:]
    if draws.row_shift.shape != batch.shape[:2]:
        raise ValueError(
            f"draws are for {draws.row_shift.shape} (patches, rows), patches are {batch.shape}"
        )

    def extent(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sub = batch[idx]
        return sub.min(axis=(1, 2), keepdims=True), sub.max(axis=(1, 2), keepdims=True)

    idx = np.flatnonzero(draws.contrast != 1.0)
    if idx.size:
        batch[idx] = _column_contrast(batch[idx], draws.contrast[idx], column_radius)

    idx = np.flatnonzero(draws.blur > 0)
    if idx.size:
        batch[idx] = _gaussian_blur(batch[idx], draws.blur[idx])

    moved = (draws.scale != 1.0) | np.any(draws.drift != 0, axis=1)
    moved |= np.any(draws.row_shift != 0, axis=1)
    idx = np.flatnonzero(moved)
    if idx.size:
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        rows = np.arange(height, dtype=np.float64)[None, :, None] - cy
        cols = np.arange(width, dtype=np.float64)[None, None, :]
        scale = draws.scale[idx][:, None, None]
        stretch = draws.drift[idx, 0][:, None, None] / height
        shear = draws.drift[idx, 1][:, None, None] / height
        # Where the scan reads (drift, jitter), then that point on the zoomed object.
        y_scan = rows * (1.0 + stretch)
        x_scan = cols - draws.row_shift[idx][:, :, None] - shear * rows - cx
        ys = np.broadcast_to(cy + y_scan / scale, (idx.size, height, width))
        xs = cx + x_scan / scale
        # One 2-D call per patch: faster than one 3-D call over the batch.
        for k, i in enumerate(idx):
            batch[i] = map_coordinates(
                batch[i], (ys[k], xs[k]), order=1, mode="reflect", output=np.float32
            )

    # Rows of each patch's recording grid; one that rounds to the patch's own is as recorded.
    grid = np.maximum(2, np.round(height * draws.sampling)).astype(int)
    grid_rows = np.where(draws.sampling != 1.0, grid, height)
    resampled = grid_rows != height
    idx = np.flatnonzero(np.isfinite(draws.dose) & ~resampled)
    if idx.size:
        noisy = _shot_noise(batch[idx].reshape(idx.size, -1), draws.dose[idx], rng)
        batch[idx] = noisy.reshape(idx.size, height, width)
    if resampled.any():
        # Patches whose recording grids have the same rows share one pair of matrices.
        for rows in np.unique(grid_rows[resampled]):
            idx = np.flatnonzero(resampled & (grid_rows == rows))
            batch[idx] = _recorded_at(batch[idx], rows / height, draws.dose[idx], rng)

    idx = np.flatnonzero((draws.gain != 1.0) | (draws.offset != 0.0))
    if idx.size:
        lo, hi = extent(idx)
        gain = draws.gain[idx].astype(np.float32)[:, None, None]
        offset = draws.offset[idx].astype(np.float32)[:, None, None] * (hi - lo)
        batch[idx] = batch[idx] * gain + offset
    return batch


def _shot_noise(flat: np.ndarray, dose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts of each row of ``flat`` (k, pixels), its brightest pixel at ``dose``.

    The intensity above a row's 1st percentile is mapped to counts and back; a flat row
    has no brightest column to scale to and comes back as it was.
    """
    sub = flat.astype(np.float64)
    lo = np.percentile(sub, 1.0, axis=1, keepdims=True)
    span = sub.max(axis=1, keepdims=True) - lo
    flat_rows = span[:, 0] <= 0
    span[flat_rows] = 1.0
    dose = dose[:, None]
    counts = rng.poisson(np.clip(sub - lo, 0.0, None) / span * dose)
    noisy = counts / dose * span + lo
    noisy[flat_rows] = sub[flat_rows]
    return noisy


@functools.lru_cache(maxsize=128)
def _resampling_matrix(size: int, out: int) -> np.ndarray:
    """The (out, size) matrix the runtime's resampling applies along an axis of ``size``
    pixels zoomed to ``out``.

    :func:`~defectscope.tiling.resample.resample_frame`'s steps on a frame it reads in
    one band (the anti-aliasing Gaussian when shrinking, then the cubic spline sampling
    input ``(y + 0.5) / f - 0.5``, both reflecting at the edges) are separable, so one
    axis of them applied to the identity is the matrix (the other axis samples its own
    nodes, which a spline interpolates exactly).
    """
    from scipy.ndimage import affine_transform, gaussian_filter1d

    from defectscope.tiling.resample import ORDER, TRUNCATE

    factor = out / size
    basis = np.eye(size)
    sigma = max(0.0, (1.0 / factor - 1.0) / 2.0)
    if sigma > 0:
        basis = gaussian_filter1d(basis, sigma, axis=0, mode="reflect", truncate=TRUNCATE)
    matrix = affine_transform(
        basis, (1.0 / factor, 1.0), offset=(0.5 / factor - 0.5, 0.0),
        output_shape=(out, size), order=ORDER, mode="reflect",
    )  # fmt: skip
    matrix.setflags(write=False)
    return matrix


def _recorded_at(
    batch: np.ndarray, sampling: float, dose: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Patches (k, H, W) recorded on a grid of ``sampling`` times their pixels per
    lattice spacing (below 1: coarser), shot noise at ``dose`` (k,) there (none where
    infinite), and resampled back to their own grid.

    Both ways are the runtime's resampling (:func:`_resampling_matrix`), the recording
    grid's rows a whole number (``round(H * sampling)``) and the way back the exact
    inverse factor. Columns take the factor that gives them a whole number too: the rows'
    for a square patch (the runtime's one factor), slightly off it otherwise.
    """
    _, height, width = batch.shape
    rows = max(2, round(height * sampling))
    cols = max(2, round(width * rows / height))
    down_h, down_w = _resampling_matrix(height, rows), _resampling_matrix(width, cols)
    recorded = down_h @ batch.astype(np.float64) @ down_w.T
    noisy = np.isfinite(dose)
    if noisy.any():
        flat = _shot_noise(recorded[noisy].reshape(int(noisy.sum()), -1), dose[noisy], rng)
        recorded[noisy] = flat.reshape(-1, rows, cols)
    up_h, up_w = _resampling_matrix(rows, height), _resampling_matrix(cols, width)
    return (up_h @ recorded @ up_w.T).astype(np.float32)


def _geometric(
    patches: np.ndarray, rng: np.random.Generator, config: Augmentation, noise: bool
) -> np.ndarray:
    """Rotation/flip, shift, gamma (and Gaussian noise when ``noise``), patch by patch."""
    out = np.empty(patches.shape, dtype=np.float32)
    size = patches.shape[-1]
    for i, patch in enumerate(patches.astype(np.float32, copy=False)):
        if config.rotate_flip:
            patch = np.rot90(patch, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
        if config.max_shift > 0:
            s = config.max_shift
            padded = np.pad(patch, s, mode="reflect")
            dy, dx = rng.integers(0, 2 * s + 1, size=2)
            patch = padded[dy : dy + size, dx : dx + size]
        lo, hi = float(patch.min()), float(patch.max())
        gamma = float(rng.uniform(*config.gamma_range))
        if hi > lo and gamma != 1.0:
            patch = ((patch - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
        if noise and config.noise_std > 0:
            sigma = float(rng.uniform(0, config.noise_std)) * float(patch.std())
            patch = patch + rng.normal(0.0, sigma, size=patch.shape).astype(np.float32)
        out[i] = patch
    return out


def augment_batch(
    patches: np.ndarray, rng: np.random.Generator, config: Augmentation = Augmentation()
) -> np.ndarray:
    """Return randomly transformed float32 copies of ``patches`` (n, P, P).

    Shifts reflect at the border so no constant padding enters the lattice;
    gamma acts on the patch scaled to 0..1, then the original range is restored;
    noise is Gaussian with a standard deviation relative to each patch's own.
    With ``config.physical`` the physical transforms (:func:`apply_physical`)
    follow the geometric ones and the Gaussian noise comes last, as read noise;
    without, the result and the draws from ``rng`` are the geometric ones alone.

    Parameters
    ----------
    patches : ndarray, shape (n, P, P)
    rng : numpy.random.Generator
    config : Augmentation

    Returns
    -------
    ndarray of float32, shape (n, P, P)
    """
    if not config.physical:
        return _geometric(patches, rng, config, noise=True)
    batch = _geometric(patches, rng, config, noise=False)
    draws = draw_physical(len(batch), batch.shape[1], rng, config)
    batch = apply_physical(batch, draws, rng, config.column_radius)
    if config.noise_std > 0:
        sigma = rng.uniform(0, config.noise_std, size=len(batch)) * batch.std(axis=(1, 2))
        noise = rng.standard_normal(batch.shape) * sigma[:, None, None]
        batch += noise.astype(np.float32)
    return batch


# Seed of the physically augmented copies the densities (embedding and lattice residual)
# are fitted on (fixed: a model's densities are the same whenever they are fitted).
DENSITY_AUGMENTATION_SEED = 0


def density_augmentation(augmentation: Augmentation | None) -> Augmentation | None:
    """The augmentation of the density's extra copies, or None when there are none.

    ``augmentation`` with rotations, flips and shifts off (the density is of what a window
    looks like where it lies, not of its symmetric copies) and the physical variations
    drawn from training's ranges for every copy (training leaves some patches as
    recorded; a copy left so would only repeat its patch). None when ``augmentation`` is
    None or its physical part is off: a model that never saw those variations does not
    know them.
    """
    if augmentation is None or not augmentation.physical:
        return None
    return dataclasses.replace(
        augmentation, rotate_flip=False, max_shift=0, physical=True, physical_probability=1.0
    )


def with_physical_copies(
    images: np.ndarray,
    labels: np.ndarray | None,
    augmentation: Augmentation | None,
    rng: np.random.Generator | None,
    copies: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` followed by ``copies`` copies of each drawn from ``density_augmentation``.

    What a density is fitted on: the patches, and, when training's physical part was
    on, physically varied copies of each (labels repeated). Without it the patches
    (and labels) come back as they are, and ``rng`` (then unused) may be None.
    """
    augmentation = density_augmentation(augmentation)
    if augmentation is None or copies < 1:
        return images, labels
    varied = [augment_batch(images, rng, augmentation) for _ in range(copies)]
    images = np.concatenate([images, *varied])
    if labels is not None:
        labels = np.concatenate([labels] * (copies + 1))
    return images, labels


# Windows a density's held-out set (validation patches and their physical copies) should
# reach: its threshold is a high quantile (0.99) of their distances, which a few hundred
# windows set from a handful of them. With one copy of each of a synthetic model's 318
# validation patches, sixteen draws of the copies set its threshold from 738 to 1135.
HELD_OUT_WINDOWS = 4000
MAX_HELD_OUT_COPIES = 8


def held_out_copies(n_patches: int) -> int:
    """Physical copies of each of ``n_patches`` validation patches: enough to reach
    :data:`HELD_OUT_WINDOWS` windows, at least one and at most :data:`MAX_HELD_OUT_COPIES`."""
    wanted = math.ceil(HELD_OUT_WINDOWS / max(n_patches, 1)) - 1
    return int(min(MAX_HELD_OUT_COPIES, max(1, wanted)))


def density_fit_sets(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    validation_images: np.ndarray | None,
    augmentation: Augmentation | None,
    seed: int = DENSITY_AUGMENTATION_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What a novelty density is fitted and thresholded on: ``(images, labels, held_out)``.

    The training patches with one physically varied copy of each, then the validation
    patches with :func:`held_out_copies` copies of each (:func:`with_physical_copies`,
    from one generator seeded with ``seed``, training first, so both densities of a
    model see the same copies). ``held_out`` is None with fewer than two validation
    patches (no threshold can be set on them).
    """
    rng = np.random.default_rng(seed)
    images, labels = with_physical_copies(train_images, train_labels, augmentation, rng)
    held_out = None
    if validation_images is not None and len(validation_images) >= 2:
        copies = held_out_copies(len(validation_images))
        held_out, _ = with_physical_copies(validation_images, None, augmentation, rng, copies)
    return images, labels, held_out
