"""Density of the lattice residual: is what a window holds beyond its lattice known?

The embedding's density (:mod:`defectscope.artifacts.density`) flags new structures
but not a new point defect in a lattice the model knows: an embedding trained to tell
the known classes apart maps such a window next to the class it most resembles. The
residual against the window's own ideal lattice
(:func:`defectscope.tiling.residual.residual_descriptors`) keeps exactly what a point
defect changes: how much intensity is added or missing, over what size, on a column
or between columns. Its class-conditional Gaussian density over the training patches
(the same :class:`~defectscope.artifacts.density.FeatureDensity`, with its threshold
set on the validation patches) says when a window's residual is unlike every known
class's: a strong residual no known class explains is new.

It needs the windows' pixels, not the network: NumPy and SciPy (and the runtime's
threadpoolctl), so every runtime (ONNX, TensorRT, dense) applies it, and it costs no
second network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from defectscope.artifacts.density import DEFAULT_QUANTILE, FeatureDensity, fit_density
from defectscope.tiling.residual import (
    PEAK_FACTOR,
    check_centre,
    descriptor_size,
    residual_descriptors,
)
from defectscope.util.blas import one_blas_thread

KIND = "lattice-residual"
# Version of the descriptor layout: a record of another version cannot be applied.
# 1: extremes over the whole window; 2: over its central square (``centre``), which an
# older build cannot compute and so must refuse.
DESCRIPTOR_VERSION = 1
CENTRE_DESCRIPTOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ResidualDensity:
    """A :class:`FeatureDensity` of the lattice-residual descriptors of windows.

    Attributes
    ----------
    density : FeatureDensity
        Over :func:`~defectscope.tiling.residual.residual_descriptors` rows.
    patch_size : int
        Side of the windows it was fitted on (the descriptors' length depends on it).
    peak_factor : float
        Bragg peak threshold the descriptors were computed with.
    centre : float, optional
        Share of the window's side whose central square the residual's extremes are
        taken in (fitted on patches centred on their defects); None: the whole window.
    """

    density: FeatureDensity
    patch_size: int
    peak_factor: float = PEAK_FACTOR
    centre: float | None = None

    def __post_init__(self) -> None:
        # Refuse a bad share when made, not only when its record is read back.
        object.__setattr__(self, "centre", check_centre(self.centre))

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(distance, uncertainty, unknown)`` per window, as :meth:`FeatureDensity.score`.

        Parameters
        ----------
        windows : ndarray, shape (n, patch_size, patch_size)
            Raw or normalized windows: any per-window gain and offset (z-score,
            min-max, ImageNet normalization of a gray channel) gives the same scores.

        Raises
        ------
        ValueError
            For windows of another size, or as ``residual_descriptors``.
        """
        windows = np.asarray(windows)
        if windows.ndim != 3 or windows.shape[1:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"the lattice-residual density is for {self.patch_size} px windows, "
                f"got an array of shape {windows.shape}"
            )
        # One limit around both: the density's product would otherwise wake BLAS threads
        # that spin into the next frame's network.
        with one_blas_thread():
            return self.density.score(residual_descriptors(windows, self.peak_factor, self.centre))

    def to_dict(self) -> dict[str, Any]:
        record = {
            "kind": KIND,
            "descriptor_version": DESCRIPTOR_VERSION,
            "patch_size": int(self.patch_size),
            "peak_factor": float(self.peak_factor),
            "density": self.density.to_dict(),
        }
        if self.centre is not None:
            record["descriptor_version"] = CENTRE_DESCRIPTOR_VERSION
            record["centre"] = float(self.centre)
        return record

    @classmethod
    def from_dict(cls, data: Any, n_classes: int | None = None) -> ResidualDensity:
        """Read and check a stored record; ValueError names the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"residual density must be an object, got {type(data).__name__}")
        if data.get("kind") != KIND:
            raise ValueError(f"residual density kind must be {KIND!r}, got {data.get('kind')!r}")
        version = data.get("descriptor_version")
        versions = (DESCRIPTOR_VERSION, CENTRE_DESCRIPTOR_VERSION)
        if isinstance(version, bool) or version not in versions:
            raise ValueError(
                f"residual density descriptor version {version!r} is not one of this "
                f"build's {versions}; fit it again (defectscope train)"
            )
        centre = None
        if version == DESCRIPTOR_VERSION and "centre" in data:
            raise ValueError(
                "residual density of descriptor version 1 (the whole window) has a centre; "
                "a centred one is version 2"
            )
        if version == CENTRE_DESCRIPTOR_VERSION:
            centre = check_centre(data.get("centre"))  # its error names a bad value
            if centre is None:
                raise ValueError("residual density centre must be a share in (0, 1], got none")
        size = data.get("patch_size")
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096:
            raise ValueError(f"residual density patch_size must be 16-4096 px, got {size!r}")
        factor = data.get("peak_factor", PEAK_FACTOR)
        try:  # a JSON integer of 400 digits is a Python int that float() refuses
            number = float(factor) if not isinstance(factor, bool | str) else float("nan")
        except (OverflowError, TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number) or number <= 1:
            raise ValueError(f"residual density peak_factor must be a number > 1, got {factor!r}")
        factor = number
        density = FeatureDensity.from_dict(
            data.get("density"), n_classes, descriptor_size(size, size)
        )
        return cls(density, size, factor, centre)


def fit_residual_density(
    windows: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    held_out: np.ndarray | None = None,
    quantile: float = DEFAULT_QUANTILE,
    peak_factor: float = PEAK_FACTOR,
    centre: float | None = None,
) -> ResidualDensity:
    """Fit the residual density on training patches; set its scale on held-out ones.

    Parameters
    ----------
    windows : ndarray, shape (n, P, P)
        Training patches (raw gray; training adds one physically varied copy of each,
        :func:`defectscope.training.augment.density_fit_sets`).
    labels : ndarray of int, shape (n,)
    n_classes : int
    held_out : ndarray, shape (m, P, P), optional
        In-distribution patches not fitted on (the validation fold), which set the
        threshold (see :func:`~defectscope.artifacts.density.fit_density`).
    quantile : float
        Share of held-out in-distribution windows that stay known.
    peak_factor : float
        Bragg peak threshold of the ideal lattice.
    centre : float, optional
        Take the residual's extremes in the central square of this share of the side
        (:data:`~defectscope.tiling.residual.CENTRE_SHARE` for patches centred on their
        defects, as ``simulate`` cuts them); None: the whole window.

    Raises
    ------
    ValueError
        For non-square or mismatched windows, or as ``fit_density``.
    """
    windows = np.asarray(windows)
    if windows.ndim != 3 or windows.shape[1] != windows.shape[2]:
        raise ValueError(f"need (n, P, P) square patches, got shape {windows.shape}")
    size = int(windows.shape[1])
    reference = None
    if held_out is not None and len(held_out) >= 2:
        held_out = np.asarray(held_out)
        if held_out.shape[1:] != windows.shape[1:]:
            raise ValueError(
                f"held-out patches are {held_out.shape[1:]}, training ones {windows.shape[1:]}"
            )
        reference = residual_descriptors(held_out, peak_factor, centre)
    density = fit_density(
        residual_descriptors(windows, peak_factor, centre), labels, n_classes, reference, quantile
    )
    return ResidualDensity(density, size, float(peak_factor), check_centre(centre))
