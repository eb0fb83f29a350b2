"""The instrument: what the microscope adds to a clean image (:func:`acquire`).

Scan-line jitter, drift, a slow intensity gradient, Poisson shot noise at a dose, gain,
offset and read noise. Every position is carried through these distortions into the
recorded frame's pixels (the ``to_frame`` map), so defects keep known places.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# numpy's Poisson sampler refuses means past about 9.2e18 ("lam value too large"); a
# dose far below that keeps every pixel's mean drawable, and a uint16 frame saturates
# long before.
MAX_DOSE = 1e12
_MAX_MEAN_COUNTS = 1e18


@dataclasses.dataclass(frozen=True)
class Instrument:
    """What the microscope adds to a clean image.

    Attributes
    ----------
    dose : float
        Expected electron counts at the brightest columns (Poisson noise).
    jitter : float
        Standard deviation, in pixels, of each scan line's shift along x.
    drift : (float, float)
        Total drift ``(y, x)`` in pixels over the frame (a linear shear and stretch).
    gradient : float
        Largest relative change of a slow, linear intensity ramp across the frame.
    gain, offset, read_noise : float
        Detector counts per electron, dark level and Gaussian read noise in counts.
    """

    dose: float = dataclasses.field(
        default=200.0, metadata={"help": "electrons at the brightest columns"}
    )
    jitter: float = dataclasses.field(default=0.3, metadata={"help": "scan-line jitter, pixels"})
    drift: tuple[float, float] = dataclasses.field(
        default=(2.0, 3.0),
        metadata={"help": "total drift (y, x) over the frame, pixels", "metavar": ("DY", "DX")},
    )
    gradient: float = dataclasses.field(
        default=0.15, metadata={"help": "largest relative change of a slow intensity ramp"}
    )
    gain: float = dataclasses.field(default=4.0, metadata={"help": "detector counts per electron"})
    offset: float = dataclasses.field(default=100.0, metadata={"help": "dark level, counts"})
    read_noise: float = dataclasses.field(
        default=2.0, metadata={"help": "Gaussian read noise, counts"}
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        if len(self.drift) != 2:
            raise ValueError(f"drift is (y, x) in pixels, got {self.drift}")
        finite = all(map(math.isfinite, (self.dose, self.jitter, *self.drift, self.gradient)))
        if not finite or not all(map(math.isfinite, (self.gain, self.offset, self.read_noise))):
            raise ValueError(f"instrument settings must be finite numbers: {self}")
        if self.dose <= 0:
            raise ValueError(f"dose must be positive, got {self.dose}")
        if self.dose > MAX_DOSE:
            raise ValueError(f"dose {self.dose:g} is over the limit of {MAX_DOSE:g} electrons")
        if self.jitter < 0 or self.read_noise < 0 or self.gain <= 0:
            raise ValueError("jitter and read noise must be >= 0, gain > 0")
        if not 0 <= self.gradient < 2:
            raise ValueError(f"gradient must be in [0, 2), got {self.gradient}")
        if max(abs(v) for v in self.drift) > 1e4 or self.jitter > 1e3:
            raise ValueError(f"drift {self.drift} or jitter {self.jitter} pixels is too large")

    def margin(self) -> int:
        """Pixels of clean image needed around the frame for the scan distortions."""
        return math.ceil(4 * self.jitter + max(abs(v) for v in self.drift)) + 2


def acquire(
    clean: np.ndarray, margin: int, instrument: Instrument, rng: np.random.Generator
) -> tuple[np.ndarray, Any]:
    """Record a frame from ``clean`` (the field plus ``margin`` pixels on every side).

    Returns
    -------
    frame : ndarray of uint16, shape ``clean.shape - 2 * margin``
    to_frame : callable
        ``to_frame(row, col)`` maps clean-image pixel coordinates (without the margin)
        to the recorded frame's, through drift and jitter.

    Raises
    ------
    ValueError
        When the image is smaller than its margin, or the expected counts (dose times
        the image's peak over its 99.9th percentile) are past what can be drawn.
    """
    from scipy.ndimage import map_coordinates

    height, width = clean.shape[0] - 2 * margin, clean.shape[1] - 2 * margin
    if height < 1 or width < 1:
        raise ValueError(f"clean image {clean.shape} is smaller than its margin {margin}")
    shift_x = rng.normal(0.0, instrument.jitter, height) + instrument.drift[1] * np.arange(
        height
    ) / max(height, 1)
    stretch_y = instrument.drift[0] / max(height, 1)
    rows = np.arange(height, dtype=np.float64)
    rr = np.repeat(rows * (1 + stretch_y) + margin, width).reshape(height, width)
    cc = np.arange(width, dtype=np.float64)[None, :] + margin + shift_x[:, None]
    image = map_coordinates(clean, [rr, cc], order=3, mode="nearest")
    image = np.clip(image, 0, None) / max(np.percentile(clean, 99.9), 1e-12)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2
    image *= 1 + instrument.gradient * 0.5 * ramp
    peak = float(image.max()) * instrument.dose
    if not peak < _MAX_MEAN_COUNTS:  # NaN included
        raise ValueError(
            f"dose {instrument.dose:g}: the brightest pixel expects {peak:.3g} electrons, past "
            f"{_MAX_MEAN_COUNTS:.0e}; lower the dose (or use a wider probe on sparse atoms)"
        )
    counts = rng.poisson(np.clip(image, 0, None) * instrument.dose).astype(np.float64)
    signal = counts * instrument.gain + instrument.offset
    signal += rng.normal(0.0, instrument.read_noise, signal.shape)
    frame = np.clip(np.rint(signal), 0, np.iinfo(np.uint16).max).astype(np.uint16)

    def to_frame(row: float, col: float) -> tuple[float, float]:
        i = row / (1 + stretch_y)
        k = int(np.clip(round(i), 0, height - 1))
        return i, col - shift_x[k]

    return frame, to_frame
