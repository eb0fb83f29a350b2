"""Lattice periods from power spectra: how large a crystal's repeat is, in pixels.

A crystalline frame's power spectrum holds sharp Bragg peaks on a smooth background. The
peaks' distance from the centre is the inverse of a lattice period; grouped by radius
into shells they do not depend on the lattice's rotation. A model records the periods of
its training patches (:func:`measure_patch_periods`); a frame's periods
(:func:`measure_frame_periods`) then give the zoom that brings the frame to the model's
scale (:func:`match_scale`).

How a spectrum is measured (both functions):

- square tiles are read one at a time (a memmap is never read whole): a frame's are
  256 px, or the largest power of two up to half its short side (64 px at least where
  it has them; several tiles average out the noise better than one large one), at most
  4 x 4 spread over the frame with at most half a tile of overlap; patches: each patch
  (at most :data:`MAX_PATCHES`). Each is made float64, its non-finite pixels set to its
  finite mean (a tile more than half non-finite is skipped), a least-squares plane
  taken off (a gradient has no peaks but leaks around the centre);
- each tile is multiplied by a radially symmetric 4-term Blackman-Harris window (side
  lobes 92 dB down, so a strong peak leaves no side-lobe "peaks" that would look like a
  second shell, and its leakage is the same in every direction), its window-weighted
  mean taken off first, zero-padded to at least twice its side (the spectrum sampled
  every half bin or finer; 256 at least), and its power spectrum, divided by its total
  so every tile counts the same, is averaged;
- candidates are local maxima at least :data:`MIN_RADIUS_BINS` tile bins from the
  centre; each one's background is the larger of the spectrum's median on a ring 5-7
  bins around it and its median over the annulus at its radius, corrected for the
  median of averaged noise power, and at least :data:`LEAKAGE` times the spectrum's
  strongest value. A peak's *strength* is its power over that background (noise alone:
  about 1). It counts when it passes :data:`MIN_STRENGTH` (more for tiles under 64 px)
  and the level that noise alone passes with probability :data:`FALSE_ALARM` anywhere
  in the spectrum (higher when few tiles are averaged: 14 for one 64 px tile);
- each peak's position is refined to a small fraction of a bin by a parabola through
  the log power along each axis (the window's main lobe is close to a Gaussian at its
  top); its radius ``r`` (cycles per pixel) gives the period ``1 / r``. Periods from
  2 px up to a third of the tile side count (longer ones sit in the centre's leakage);
- peaks whose radii agree within :data:`SHELL_TOLERANCE` form a shell, its radius the
  strength-weighted mean of theirs, its strength its strongest peak's; the strongest
  :data:`MAX_SHELLS` shells are returned, strongest first.

Layer 2 (``tiling``): numpy and scipy only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.special

__all__ = [
    "MAX_SHELLS",
    "MIN_STRENGTH",
    "SCALE_RANGE",
    "SHELL_TOLERANCE",
    "LatticePeriods",
    "match_scale",
    "measure_frame_periods",
    "measure_patch_periods",
]

SCALE_RANGE = (0.25, 4.0)
"""Factors a caller may apply; outside it, the frame is mapped unscaled (with a warning)."""

TILE = 256
"""Side of a frame's tiles (smaller frames: the largest power of two that fits)."""
MAX_TILES_PER_AXIS = 4
MIN_SIDE = 32
"""A frame's smallest side that can be measured."""
MIN_PATCH_SIDE = 16
MAX_PATCHES = 512
"""Patches averaged at most (evenly spaced over the stack): more adds time, not precision."""
MIN_PADDED = 256
"""Zero-padded spectrum side at least (a 64 px patch is padded 4x)."""
MIN_RADIUS_BINS = 3.0
"""Peaks closer than this to the centre, in bins of the unpadded tile, are not looked at."""
RING_BINS = (5.0, 6.0, 7.0)
"""Radii, in unpadded bins, of the ring whose median is a peak's local background."""
LOBE_BINS = 4.5
"""Radius, in unpadded bins, of the window's main lobe (4 bins) and a little more."""
MIN_STRENGTH = 8.0
"""A peak's power over its background must pass this (and the noise level, see above)."""
FALSE_ALARM = 1e-3
"""Probability that noise alone makes a peak anywhere in a spectrum."""
LEAKAGE = 1e-8
"""Power, relative to the spectrum's strongest, below which nothing counts (10x the
window's side-lobe level)."""
MAX_CANDIDATES = 64
SHELL_TOLERANCE = 0.02
"""Relative radius difference within which peaks form one shell."""
MAX_SHELLS = 4
MAX_ENTRIES = 8
"""Most periods a :class:`LatticePeriods` may hold (a record read from a file)."""
MATCH_TOLERANCE = 0.025
"""Relative period difference within which a scaled frame shell matches a model shell."""


@dataclasses.dataclass(frozen=True)
class LatticePeriods:
    """Lattice periods measured from a power spectrum.

    Attributes
    ----------
    periods : tuple of float
        Periods in pixels of the strongest distinct Bragg-peak shells, strongest first
        (at most :data:`MAX_ENTRIES`; the measurement returns at most
        :data:`MAX_SHELLS`). Empty when not measurable.
    strengths : tuple of float
        Each shell's strength, same order: the power of its strongest peak over the
        spectrum's local background (noise alone gives about 1; a peak counts from
        :data:`MIN_STRENGTH`). Dimensionless, > 0, not comparable across tile sizes.
    measurable : bool
        False for a frame without lattice peaks (vacuum, noise, amorphous).
    reason : str or None
        Why not measurable; None when measurable.
    longest : float or None
        The longest period (px) the measurement resolves reliably: its tile side over
        :data:`LOBE_BINS` (a longer period's peak sits in the window's central lobe and
        the background's leakage). 64 px patches see a 19.5 px lattice's (1,0) shell
        only at some contrasts; a frame's 256 px tiles always do. :func:`match_scale`
        does not hold it against a factor that the other side shows a shell this
        measurement could not resolve. None in records written before it was kept.
    """

    periods: tuple[float, ...]
    strengths: tuple[float, ...]
    measurable: bool = True
    reason: str | None = None
    longest: float | None = None

    def __post_init__(self) -> None:
        periods = _positive_floats("periods", self.periods)
        strengths = _positive_floats("strengths", self.strengths)
        if len(periods) != len(strengths):
            raise ValueError(
                f"strengths must have one entry per period: {len(periods)} periods, "
                f"{len(strengths)} strengths"
            )
        if not isinstance(self.measurable, bool | np.bool_):
            raise ValueError(f"measurable must be true or false, got {self.measurable!r}")
        if self.reason is not None and not isinstance(self.reason, str):
            raise ValueError(f"reason must be text or null, got {self.reason!r}")
        if self.measurable and not periods:
            raise ValueError("periods must not be empty when measurable is true")
        if not self.measurable and periods:
            raise ValueError(f"periods must be empty when measurable is false, got {periods}")
        object.__setattr__(self, "periods", periods)
        object.__setattr__(self, "strengths", strengths)
        object.__setattr__(self, "measurable", bool(self.measurable))
        if self.longest is not None:
            longest = self.longest
            if (
                isinstance(longest, bool)
                or not isinstance(longest, int | float | np.integer | np.floating)
                or not (math.isfinite(longest) and longest > 0)
            ):
                raise ValueError(f"longest must be a period > 0 in pixels, got {longest!r}")
            object.__setattr__(self, "longest", float(longest))
        if not self.measurable and not self.reason:
            object.__setattr__(self, "reason", "not measurable")

    @property
    def primary(self) -> float | None:
        """The strongest shell's period in pixels, or None when there is none."""
        return self.periods[0] if self.periods else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: ``periods`` (px), ``strengths``, ``measurable``, ``reason``,
        ``longest`` (px)."""
        return {
            "periods": list(self.periods),
            "strengths": list(self.strengths),
            "measurable": self.measurable,
            "reason": self.reason,
            "longest": self.longest,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatticePeriods:
        """Build and check a record written by :meth:`to_dict`.

        Unknown keys are ignored (records written by later versions still load).

        Raises
        ------
        ValueError
            Naming the key whose value is missing or wrong.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"lattice periods must be an object, got {type(data).__name__}")
        for key in ("periods", "strengths"):
            if key not in data:
                raise ValueError(f"{key} is missing")
            if not isinstance(data[key], list | tuple):
                raise ValueError(f"{key} must be a list of numbers, got {data[key]!r}")
        measurable = data.get("measurable", True)
        if not isinstance(measurable, bool):
            raise ValueError(f"measurable must be true or false, got {measurable!r}")
        return cls(
            tuple(data["periods"]),
            tuple(data["strengths"]),
            measurable,
            data.get("reason"),
            data.get("longest"),
        )


def measure_frame_periods(frame: np.ndarray) -> LatticePeriods:
    """Measure the lattice periods of a frame (see the module docstring for how).

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        Any real dtype and byte order, any strides; an ``np.memmap`` is read tile by
        tile (at most 16 tiles of 256 x 256). Non-finite pixels are replaced by their
        tile's finite mean (they add no peak); a tile more than half non-finite is
        skipped.

    Returns
    -------
    LatticePeriods
        ``measurable=False`` with a reason for a frame smaller than 32 px, a constant
        frame, one whose sampled tiles are not finite, or one without a peak above the
        noise (vacuum, noise, amorphous material).

    Raises
    ------
    ValueError
        When ``frame`` is not a 2-D array of real numbers.
    """
    frame = _check_array(frame, 2, "frame")
    height, width = frame.shape
    if min(height, width) < MIN_SIDE:
        return _not_measurable(
            f"the frame ({height} x {width} px) is too small to measure a lattice period "
            f"(needs {MIN_SIDE} px a side)"
        )
    # Tiles of half the short side or less: several tiles averaged are far steadier
    # against noise than one large one, and 256 px resolve periods to 0.1 %.
    # (64 px at least where the frame has it: smaller tiles see the leakage of a smooth
    # background's lowest frequencies as far out as the shortest periods they measure).
    short = min(height, width)
    side = min(TILE, max(min(short, 64), 1 << ((short // 2).bit_length() - 1)))
    side = 1 << (side.bit_length() - 1)
    rows, cols = _tile_starts(height, side), _tile_starts(width, side)
    tiles = (frame[y : y + side, x : x + side] for y in rows for x in cols)
    return _measure(tiles, side, "frame")


def measure_patch_periods(patches: np.ndarray) -> LatticePeriods:
    """Measure the lattice periods of a stack of training patches.

    The patches' spectra are averaged (each windowed, zero-padded to 256 or twice the
    side, normalized to unit total power): peak positions are the same in every patch
    of one lattice, so the average gains signal over the noise, and a minority of
    defect patches, which still show the lattice around the defect, only adds a little
    diffuse background. A median of per-patch periods would be far noisier: one 64 px
    patch holds few periods and, at low dose, little signal. At most :data:`MAX_PATCHES` patches,
    evenly spaced over the stack, are used.

    Parameters
    ----------
    patches : ndarray, shape (n, P, P)
        Any real dtype and byte order (a memmap is read patch by patch); ``P >= 16``.

    Returns
    -------
    LatticePeriods
        As :func:`measure_frame_periods`; periods in the patches' pixels.

    Raises
    ------
    ValueError
        When ``patches`` is not a non-empty ``(n, P, P)`` array of real numbers.
    """
    patches = _check_array(patches, 3, "patches")
    n, height, width = patches.shape
    if n == 0:
        raise ValueError("patches is empty: no patch to measure")
    if height != width:
        raise ValueError(f"patches must be square, got {height} x {width}")
    if height < MIN_PATCH_SIDE:
        return _not_measurable(
            f"patches of {height} px are too small to measure a lattice period "
            f"(needs {MIN_PATCH_SIDE} px)"
        )
    chosen = np.unique(np.linspace(0, n - 1, min(n, MAX_PATCHES)).round().astype(np.int64))
    return _measure((patches[i] for i in chosen), height, "patches")


def match_scale(model: LatticePeriods, frame: LatticePeriods) -> float | None:
    """The zoom ``f`` that gives a frame the model's lattice periods.

    Every pairing of a model shell and a frame shell proposes ``f = model_period /
    frame_period``. A proposal scores, over both sides' shells, each shell's weight
    ``log(1 + strength)`` when a shell of the other side (scaled by ``f``) matches it
    within 2.5 %, minus it when none does and one should. A shell shorter
    than all of the other side's does not count against a proposal (higher orders fade
    into the noise, and a measurement keeps at most four shells), a longer one does (a
    lattice's longest periods are seen by any measurement). So the longest periods must
    correspond, and the order of the strengths decides nothing: a square lattice whose
    (1,1) shell outshines its (1,0) shell at another contrast still matches, where
    pairing the strongest shells would be off by sqrt(2). The best proposal wins, ties
    going to the factor nearest 1; its factor is then refined over all matched pairs
    (weighted mean of ``log(model / frame)``).

    A lattice that is its own copy at another scale (a square lattice's (1,1) shells
    are a square lattice sqrt(2) finer) is told apart only by its longest shell, which
    small patches may not resolve: a shell of one side that, scaled, is longer than the
    other side's :attr:`LatticePeriods.longest` does not count against a proposal
    (without it, a frame showing the (1,0) shell its model's 64 px patches could not
    see came out sqrt(2) off).

    Parameters
    ----------
    model, frame : LatticePeriods
        The model's (training patches') and the frame's periods.

    Returns
    -------
    float or None
        ``f`` (resample the frame by ``f``; no range check, see :data:`SCALE_RANGE`), or
        None when either side has no periods.
    """
    if not (model.measurable and frame.measurable and model.periods and frame.periods):
        return None
    log_model = np.log(np.asarray(model.periods))
    log_frame = np.log(np.asarray(frame.periods))
    w_model = np.log1p(np.asarray(model.strengths))
    w_frame = np.log1p(np.asarray(frame.strengths))
    tolerance = math.log1p(MATCH_TOLERANCE)
    log_model_longest = math.log(model.longest) if model.longest is not None else math.inf
    log_frame_longest = math.log(frame.longest) if frame.longest is not None else math.inf
    best: tuple[float, float, float] | None = None  # (-score, |log f|, log f)
    for log_f in np.unique(log_model[:, None] - log_frame[None, :]):
        scaled = log_frame + log_f
        close = np.abs(scaled[None, :] - log_model[:, None]) <= tolerance  # [model, frame]
        matched_model, matched_frame = close.any(axis=1), close.any(axis=0)
        # A shell shorter than every shell of the other side may just be too weak there
        # (higher orders fade): it does not count against f. A longer one does: a
        # lattice's longest periods are the ones any measurement sees.
        counted_model = matched_model | (log_model > scaled.min() - tolerance)
        counted_frame = matched_frame | (scaled > log_model.min() - tolerance)
        # A shell the other side's measurement cannot resolve (too long for its tiles)
        # is not missing there.
        if model.longest is not None:
            counted_frame &= matched_frame | (scaled <= log_model_longest + tolerance)
        if frame.longest is not None:
            counted_model &= matched_model | (log_model <= log_frame_longest + log_f + tolerance)
        # Matched weight minus the weight of the shells that should match and do not:
        # shares alone would let two matched shells with the rest out of range beat three
        # of four (a lattice's long shells scaled beyond what patches resolve).
        score = (w_model * (2 * matched_model - counted_model)).sum() + (
            w_frame * (2 * matched_frame - counted_frame)
        ).sum()
        key = (-round(float(score), 9), abs(float(log_f)), float(log_f))
        if best is None or key < best:
            best = key
    assert best is not None
    log_f = best[2]
    distance = np.abs(log_frame[None, :] + log_f - log_model[:, None])
    nearest = distance.argmin(axis=1)
    matched = distance[np.arange(len(log_model)), nearest] <= tolerance
    weights = w_model[matched] * w_frame[nearest[matched]]
    estimates = log_model[matched] - log_frame[nearest[matched]]
    return float(np.exp((weights * estimates).sum() / weights.sum()))


# --- measurement ----------------------------------------------------------------------


def _measure(tiles: Iterator[np.ndarray], side: int, what: str) -> LatticePeriods:
    """Average the tiles' spectra and find the shells."""
    padded = max(2 * side, MIN_PADDED)
    window = _window(side)
    total = np.zeros((padded, padded // 2 + 1))
    averaged = constant = not_finite = 0
    for tile in tiles:
        data = _prepared(np.asarray(tile, dtype=np.float64), window)
        if data is None:
            not_finite += 1
            continue
        if isinstance(data, str):
            constant += 1
            continue
        power = np.abs(scipy.fft.rfft2(data, s=(padded, padded))) ** 2
        total += power / power.sum()
        averaged += 1
    if averaged == 0:
        if not_finite:
            return _not_measurable(
                f"the {what} {'have' if what == 'patches' else 'has'} mostly non-finite "
                "pixels (NaN or inf) where measured"
            )
        return _not_measurable(
            f"the {what} {'are' if what == 'patches' else 'is'} constant: no contrast to "
            "measure a lattice in (vacuum?)"
        )
    return _shells(_full_plane(total / averaged), averaged, side)


def _prepared(tile: np.ndarray, window: np.ndarray) -> np.ndarray | str | None:
    """A tile made ready for its spectrum: non-finite pixels filled, plane and weighted
    mean removed, windowed. None when more than half is non-finite, "constant" when it
    has no contrast."""
    finite = np.isfinite(tile)
    if not finite.all():
        if finite.mean() < 0.5:
            return None
        tile = np.where(finite, tile, tile[finite].mean())
    low, high = tile.min(), tile.max()
    if not high > low:
        return "constant"
    # scale first: uint16/float frames of any magnitude give the same precision
    tile = (tile - low) / (high - low)
    side = tile.shape[0]
    axis = np.arange(side) - (side - 1) / 2
    norm = (axis**2).sum() * side
    slope_y = (axis[:, None] * tile).sum() / norm
    slope_x = (axis[None, :] * tile).sum() / norm
    tile = tile - tile.mean() - slope_y * axis[:, None] - slope_x * axis[None, :]
    tile -= (tile * window).sum() / window.sum()
    if not np.abs(tile).max() > 1e-9:
        return "constant"  # a plane (a gradient without structure)
    return tile * window


@functools.cache
def _window(side: int) -> np.ndarray:
    """Radially symmetric 4-term Blackman-Harris window, zero outside the inscribed
    circle: its leakage (side lobes -92 dB) is the same in every direction, so a radial
    background takes it in (a separable window leaks along the axes)."""
    centre = side / 2
    rho = np.hypot(*(np.indices((side, side)) - centre)) / centre
    phase = np.pi * np.minimum(rho, 1.0)
    window = (
        0.35875
        + 0.48829 * np.cos(phase)
        + 0.14128 * np.cos(2 * phase)
        + 0.01168 * np.cos(3 * phase)
    )
    window[rho >= 1.0] = 0.0
    window.setflags(write=False)
    return window


def _full_plane(half: np.ndarray) -> np.ndarray:
    """The centred full power spectrum from an ``rfft2`` half (``P(-k) = P(k)``)."""
    n = half.shape[0]
    full = np.empty((n, n))
    full[:, : n // 2 + 1] = half
    rows = (-np.arange(n)) % n
    full[:, n // 2 + 1 :] = half[rows][:, n // 2 - 1 : 0 : -1]
    return np.fft.fftshift(full)


def _shells(power: np.ndarray, averaged: int, side: int) -> LatticePeriods:
    """Find the peaks of a centred averaged power spectrum and group them into shells."""
    n = power.shape[0]
    pad = n / side  # padded bins per tile bin
    centre = n // 2
    ky, kx = np.indices(power.shape) - centre
    radius = np.hypot(ky, kx)
    near = max(1, round(pad))
    peaks = power == scipy.ndimage.maximum_filter(power, size=2 * near + 1, mode="wrap")
    # one half-plane (the other holds the same peaks mirrored), away from the centre,
    # up to the Nyquist radius (a period of 2 px)
    half = (kx > 0) | ((kx == 0) & (ky > 0))
    usable = half & (radius >= MIN_RADIUS_BINS * pad) & (radius <= n / 2) & (power > 0)
    ys, xs = np.nonzero(peaks & usable)
    order = np.argsort(power[ys, xs])[::-1][:MAX_CANDIDATES]
    ys, xs = ys[order], xs[order]
    threshold = _threshold(averaged, side)
    if len(ys) == 0:
        return _not_measurable("no peak at all in the spectrum (a smooth, featureless frame)")
    # The background under a peak: the larger of the median on a ring around it (an
    # anisotropic background) and the median over the annulus at its radius (a steep
    # isotropic one, as amorphous material gives, where a ring's median lies below the
    # centre's), that one without the main lobes of the peaks the ring finds (at small
    # radii they fill much of an annulus). Never below the window's leakage: its side
    # lobes leave up to -92 dB of the strongest component everywhere.
    floor = LEAKAGE * power.max()
    ring = np.maximum(_ring_medians(power, ys, xs, pad) / _noise_median(averaged), floor)
    likely = power[ys, xs] / ring >= threshold
    radial = _radial_medians(
        power, pad, radius[ys, xs], (ys[likely] - centre, xs[likely] - centre)
    ) / _noise_median(averaged)
    background = np.maximum(ring, radial)
    # Scan-line noise (a gain or offset that changes from line to line) draws a line
    # through the centre along an axis; its bumps are no peaks. On such a line the
    # background is at least the line's median level (a lattice's peaks on an axis
    # stand far above it).
    lobe = LOBE_BINS * pad
    for on_line, line in (
        (np.abs(xs - centre) <= lobe, power[:, centre]),
        (np.abs(ys - centre) <= lobe, power[centre, :]),
    ):
        offsets = np.abs(np.arange(n) - centre)
        level = np.median(line[(offsets >= MIN_RADIUS_BINS * pad) & (offsets <= n // 2)])
        background[on_line] = np.maximum(background[on_line], level / _noise_median(averaged))
    strength = power[ys, xs] / np.maximum(background, np.finfo(float).tiny)
    keep = strength >= threshold
    if not keep.any():
        return _not_measurable(
            f"no lattice peak stands above the noise (best {strength.max():.1f} against "
            f"{threshold:.1f} needed)"
        )
    ys, xs, strength = ys[keep], xs[keep], strength[keep]
    fy, fx = _refined(power, ys, xs)
    radii = np.hypot(fy - centre, fx - centre) / n  # cycles per pixel
    period = 1.0 / radii
    inside = (period >= 2.0) & (period <= side / MIN_RADIUS_BINS)
    if not inside.any():
        return _not_measurable("no lattice peak between 2 px and a third of the tile side")
    return dataclasses.replace(_grouped(period[inside], strength[inside]), longest=side / LOBE_BINS)


def _grouped(period: np.ndarray, strength: np.ndarray) -> LatticePeriods:
    """Group peaks (strongest first) into shells of radius within SHELL_TOLERANCE."""
    shells: list[list[int]] = []
    references: list[float] = []
    for index in np.argsort(strength)[::-1]:
        for shell, reference in zip(shells, references, strict=True):
            if abs(period[index] / reference - 1) <= SHELL_TOLERANCE:
                shell.append(int(index))
                break
        else:
            shells.append([int(index)])
            references.append(float(period[index]))
    results = []
    for shell in shells:
        weights = strength[shell]
        # average the radii (not the periods): the measured quantity is the radius
        radius = (weights / period[shell]).sum() / weights.sum()
        results.append((float(weights.max()), float(1.0 / radius)))
    results.sort(key=lambda item: -item[0])
    results = results[:MAX_SHELLS]
    return LatticePeriods(tuple(p for _, p in results), tuple(s for s, _ in results))


def _ring_medians(power: np.ndarray, ys: np.ndarray, xs: np.ndarray, pad: float) -> np.ndarray:
    """Median of the spectrum on a ring around each candidate (its local background)."""
    n = power.shape[0]
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    offsets = np.concatenate(
        [r * pad * np.stack([np.sin(angles), np.cos(angles)]) for r in RING_BINS], axis=1
    )
    offsets = np.round(offsets).astype(np.int64)
    ring_y = (ys[:, None] + offsets[0][None, :]) % n
    ring_x = (xs[:, None] + offsets[1][None, :]) % n
    return np.median(power[ring_y, ring_x], axis=1)


def _refined(power: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-bin peak positions: a parabola through the log power along each axis (the
    window's main lobe is close to a Gaussian near its top)."""
    n = power.shape[0]
    log = np.log(np.maximum(power, np.finfo(float).tiny))

    def vertex(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
        curvature = minus - 2 * centre + plus
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < 0, 0.5 * (minus - plus) / curvature, 0.0)
        return np.clip(shift, -1.0, 1.0)

    centre = log[ys, xs]
    dy = vertex(log[(ys - 1) % n, xs], centre, log[(ys + 1) % n, xs])
    dx = vertex(log[ys, (xs - 1) % n], centre, log[ys, (xs + 1) % n])
    return ys + dy, xs + dx


def _radial_medians(
    power: np.ndarray, pad: float, radii: np.ndarray, peaks: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Median of the spectrum over the annulus one tile bin wide at each of ``radii``
    (padded bins), from the unpadded bins only, leaving out the main lobes of ``peaks``
    (offsets from the centre, padded bins) and their mirror images; annuli with too few
    bins left are interpolated from their neighbours."""
    n = power.shape[0]
    step = max(1, round(pad))
    centre = n // 2
    # the unpadded DFT bins: every step-th sample through the centre
    sampled = power[centre % step :: step, centre % step :: step]
    size, middle = sampled.shape[0], (centre - centre % step) // step
    keep = np.ones(sampled.shape, bool)
    reach = int(np.ceil(LOBE_BINS))
    box = np.hypot(*np.mgrid[-reach : reach + 1, -reach : reach + 1]) <= LOBE_BINS
    for dy, dx in zip(peaks[0] / step, peaks[1] / step, strict=True):
        for sy, sx in ((dy, dx), (-dy, -dx)):
            y, x = round(middle + sy), round(middle + sx)
            y0, x0 = max(y - reach, 0), max(x - reach, 0)
            y1, x1 = min(y + reach + 1, size), min(x + reach + 1, size)
            if y0 < y1 and x0 < x1:
                keep[y0:y1, x0:x1] &= ~box[
                    y0 - y + reach : y1 - y + reach, x0 - x + reach : x1 - x + reach
                ]
    labels, starts = _annuli(size, middle)
    values, kept = sampled.ravel()[labels], keep.ravel()[labels]
    medians = np.full(len(starts) - 1, np.nan)
    for index, (a, b) in enumerate(itertools.pairwise(starts)):
        chosen = values[a:b][kept[a:b]]
        if len(chosen) >= 4:
            medians[index] = np.median(chosen)
    valid = np.flatnonzero(np.isfinite(medians))
    if len(valid) == 0:
        return np.zeros_like(radii, dtype=np.float64)
    return np.interp(radii / step, valid, medians[valid])


@functools.cache
def _annuli(size: int, centre: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of a ``size``-square grid sorted by rounded radius from ``centre``, and
    where each radius starts."""
    ky, kx = np.indices((size, size)) - centre
    rounded = np.rint(np.hypot(ky, kx)).astype(np.int64).ravel()
    order = np.argsort(rounded, kind="stable")
    starts = np.searchsorted(rounded[order], np.arange(rounded.max() + 2))
    order.setflags(write=False)
    return order, starts


@functools.cache
def _noise_median(averaged: int) -> float:
    """Median of the mean of ``averaged`` unit exponentials (noise power, normalized)."""
    return float(scipy.special.gammaincinv(averaged, 0.5) / averaged)


@functools.cache
def _threshold(averaged: int, side: int) -> float:
    """The strength that noise alone passes with probability FALSE_ALARM in a spectrum.

    Averaged noise power in one bin follows a gamma law of shape ``averaged``; the
    spectrum is searched at every padded sample, counted as if independent (they are
    not: the count errs on the safe side, as the ring's median is itself noisy)."""
    padded = max(2 * side, MIN_PADDED)
    bins = np.pi / 2 * ((side / 2) ** 2 - MIN_RADIUS_BINS**2) * (padded / side) ** 2
    level = scipy.special.gammainccinv(averaged, FALSE_ALARM / bins) / averaged
    # Tiles under 64 px see a smooth background's lowest frequencies leak out to the
    # periods they measure (measured on smoothed noise): they need a stronger peak.
    floor = MIN_STRENGTH * max(1.0, (64 / side) ** 2)
    return max(floor, float(level))


def _tile_starts(length: int, side: int) -> list[int]:
    """Tile origins spread evenly over one axis, overlapping by at most half a tile."""
    count = min(MAX_TILES_PER_AXIS, max(1, math.ceil(2 * length / side) - 1))
    return sorted({round(float(v)) for v in np.linspace(0, length - side, count)})


def _check_array(array: Any, ndim: int, name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    if array.ndim != ndim:
        shape = "(H, W)" if ndim == 2 else "(n, P, P)"
        raise ValueError(f"{name} must be a {shape} array, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _not_measurable(reason: str) -> LatticePeriods:
    return LatticePeriods((), (), measurable=False, reason=reason)


def _positive_floats(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, list | tuple | np.ndarray):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}")
    if len(values) > MAX_ENTRIES:
        raise ValueError(f"{name} holds {len(values)} entries, at most {MAX_ENTRIES} allowed")
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"{name} must hold numbers, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must hold finite numbers > 0, got {value!r}")
        result.append(float(value))
    return tuple(result)
