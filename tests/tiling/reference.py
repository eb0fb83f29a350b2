"""An independent reference for the dense normalization, shared by the tiling tests."""

from __future__ import annotations

import numpy as np


def box_reference(frame: np.ndarray, origin, shape, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel z-score over the clipped box footprint, box by box (numpy, float64).

    The footprint of pixel ``(y, x)`` is rows ``y - box/2 .. y + box/2 - 1`` and the same
    columns, clipped at the frame's edges. The frame is first scaled by a power of two
    (exact) so that no square overflows, and deviations are taken from the centre pixel,
    so neither a scale nor an offset costs the reference precision. Exactly constant
    footprints give 0 (the rule's absolute part); the caller keeps frames away from the
    relative floor (contrast of 1e-12 of the mean).

    Returns
    -------
    z : ndarray of float64, shape ``shape``
    sd : ndarray of float64, shape ``shape``
        The footprints' standard deviations, in the scaled units (0 where constant).
    """
    values = frame.astype(np.float64)
    finite = np.abs(values[np.isfinite(values)])  # non-finite pixels outside the region
    _, exponent = np.frexp(finite.max(initial=0.0))
    values = np.ldexp(values, -exponent)
    # A box twice the frame's side or more clips to the whole frame for every pixel.
    box = min(box, 2 * (max(frame.shape) + 1))
    half = box // 2
    padded = np.pad(values, ((half, box - half), (half, box - half)), constant_values=np.nan)
    boxes = np.lib.stride_tricks.sliding_window_view(padded, (box, box))
    (y0, x0), (h, w) = origin, shape
    boxes = boxes[y0 : y0 + h, x0 : x0 + w]
    centre = values[y0 : y0 + h, x0 : x0 + w]
    deviations = boxes - centre[:, :, None, None]
    constant = np.nanmax(deviations, axis=(2, 3)) == np.nanmin(deviations, axis=(2, 3))
    mean = np.nanmean(deviations, axis=(2, 3))
    sd = np.where(constant, 0.0, np.nanstd(deviations, axis=(2, 3)))
    return np.where(constant, 0.0, -mean / np.where(constant, 1.0, sd)), sd
