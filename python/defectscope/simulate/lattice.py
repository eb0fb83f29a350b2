"""A simulated specimen: a square lattice of atom columns with vacancies at known places.

Positions are in nanometres in the specimen's own frame (y down, x right), so a
simulated scan can render any field of view and centre, and a test can check that
a closed loop went where the defect is.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScanField:
    """Where a scan looks on the specimen.

    Pixel ``(i, j)`` of an ``(H, W)`` scan has the scan-frame offset
    ``d = (((i + 0.5) / H - 0.5) * fov_h, ((j + 0.5) / W - 0.5) * fov_w)`` from the
    field centre; the scan rotation turns it onto the specimen as Nion's
    ``Geometry.FloatPoint.rotate`` does: ``y = cy + sin(r) dx + cos(r) dy``,
    ``x = cx + cos(r) dx - sin(r) dy``.

    Attributes
    ----------
    center_nm : (float, float)
        Specimen position ``(y, x)`` of the field centre.
    fov_nm : (float, float)
        Field of view ``(height, width)``.
    shape : (int, int)
        Pixels ``(height, width)``.
    rotation_rad : float
        Scan rotation.
    """

    center_nm: tuple[float, float]
    fov_nm: tuple[float, float]
    shape: tuple[int, int]
    rotation_rad: float = 0.0

    def __post_init__(self) -> None:
        if min(self.shape) < 1:
            raise ValueError(f"scan shape must be positive, got {tuple(self.shape)}")
        if not all(np.isfinite(v) and v > 0 for v in self.fov_nm):
            raise ValueError(f"field of view must be positive, got {tuple(self.fov_nm)}")

    def specimen_position(self, row, col) -> tuple[np.ndarray, np.ndarray]:
        """Specimen ``(y, x)`` in nm of pixel coordinates ``(row, col)`` (arrays or floats)."""
        dy = ((np.asarray(row, dtype=np.float64) + 0.5) / self.shape[0] - 0.5) * self.fov_nm[0]
        dx = ((np.asarray(col, dtype=np.float64) + 0.5) / self.shape[1] - 0.5) * self.fov_nm[1]
        c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
        return self.center_nm[0] + s * dx + c * dy, self.center_nm[1] + c * dx - s * dy

    def pixel_of(self, y_nm: float, x_nm: float) -> tuple[float, float]:
        """Pixel coordinates ``(row, col)`` (pixel centres at integers) of a specimen point."""
        dy, dx = self._scan_offset(y_nm, x_nm)
        row = (dy / self.fov_nm[0] + 0.5) * self.shape[0] - 0.5
        col = (dx / self.fov_nm[1] + 0.5) * self.shape[1] - 0.5
        return float(row), float(col)

    def contains(self, y_nm: float, x_nm: float, margin_nm: float = 0.0) -> bool:
        """Whether a specimen point lies in the field, at least ``margin_nm`` inside its edges."""
        dy, dx = self._scan_offset(y_nm, x_nm)
        return bool(
            abs(dy) <= self.fov_nm[0] / 2 - margin_nm and abs(dx) <= self.fov_nm[1] / 2 - margin_nm
        )

    def _scan_offset(self, y_nm: float, x_nm: float) -> tuple[float, float]:
        # The inverse rotation of specimen_position.
        sy, sx = y_nm - self.center_nm[0], x_nm - self.center_nm[1]
        c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
        return -s * sx + c * sy, c * sx + s * sy


@dataclasses.dataclass(frozen=True)
class LatticeSample:
    """A square lattice of Gaussian atom columns with vacancy clusters.

    Columns sit at ``((m + 0.5) * spacing_nm, (n + 0.5) * spacing_nm)`` for all
    integers ``m, n``. Each entry of ``vacancies_nm`` removes every column within
    ``vacancy_radius_nm`` of it: the default radius removes the four columns
    around a point placed at a cell centre (a 2x2 vacancy cluster).

    Attributes
    ----------
    spacing_nm : float
        Column spacing.
    column_sigma_nm : float
        Standard deviation of a column's Gaussian intensity.
    vacancies_nm : tuple of (float, float)
        Defect positions ``(y, x)`` in nm.
    vacancy_radius_nm : float
        Columns closer than this to a defect position are missing.
    peak_counts : float
        Mean detector counts at a column centre for a 1 us dwell.
    background_counts : float
        Mean counts between columns for a 1 us dwell.
    """

    spacing_nm: float = 0.4
    column_sigma_nm: float = 0.075
    vacancies_nm: tuple[tuple[float, float], ...] = ()
    vacancy_radius_nm: float = 0.3
    peak_counts: float = 400.0
    background_counts: float = 20.0

    def __post_init__(self) -> None:
        for name in ("spacing_nm", "column_sigma_nm", "vacancy_radius_nm", "peak_counts"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not np.isfinite(self.background_counts) or self.background_counts < 0:
            raise ValueError(f"background_counts must be >= 0, got {self.background_counts}")
        object.__setattr__(
            self, "vacancies_nm", tuple((float(y), float(x)) for y, x in self.vacancies_nm)
        )

    def missing_columns(self) -> set[tuple[int, int]]:
        """Lattice indices ``(m, n)`` of the columns the vacancies remove."""
        reach = int(np.ceil(self.vacancy_radius_nm / self.spacing_nm)) + 1
        missing = set()
        for y, x in self.vacancies_nm:
            m0, n0 = round(y / self.spacing_nm - 0.5), round(x / self.spacing_nm - 0.5)
            for m in range(m0 - reach, m0 + reach + 1):
                for n in range(n0 - reach, n0 + reach + 1):
                    cy, cx = (m + 0.5) * self.spacing_nm, (n + 0.5) * self.spacing_nm
                    if np.hypot(cy - y, cx - x) < self.vacancy_radius_nm:
                        missing.add((m, n))
        return missing

    def missing_column_positions(self) -> np.ndarray:
        """``(N, 2)`` positions ``(y, x)`` in nm of the columns the vacancies remove."""
        sites = sorted(self.missing_columns())
        return (np.array(sites, dtype=np.float64).reshape(-1, 2) + 0.5) * self.spacing_nm

    def render(
        self,
        field: ScanField,
        pixel_time_us: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Detector counts of a scan of this specimen.

        Parameters
        ----------
        field : ScanField
            Where the scan looks (centre, field of view, pixels, rotation); pixel
            ``(i, j)`` samples :meth:`ScanField.specimen_position` ``(i, j)``, the
            pixel centre, as scan controllers place it.
        pixel_time_us : float
            Dwell per pixel; counts scale with it.
        rng : numpy.random.Generator, optional
            Shot noise (Poisson) source; ``None`` gives the noise-free mean.

        Returns
        -------
        ndarray, float32, shape ``field.shape``
        """
        if not np.isfinite(pixel_time_us) or pixel_time_us <= 0:
            raise ValueError(f"pixel_time_us must be positive, got {pixel_time_us}")
        rows, cols = np.indices(field.shape, dtype=np.float64)
        y, x = field.specimen_position(rows, cols)
        # A square grid of isotropic Gaussians is separable along the specimen axes.
        image = self._profile(y) * self._profile(x)
        two_var = 2 * self.column_sigma_nm**2
        for cy, cx in self.missing_column_positions():
            image -= np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / two_var)
        mean = (self.background_counts + self.peak_counts * image.clip(0, None)) * pixel_time_us
        if rng is None:
            return mean.astype(np.float32)
        return rng.poisson(mean).astype(np.float32)

    def _profile(self, coords: np.ndarray) -> np.ndarray:
        # Sum over the columns within 8 sigma of each coordinate (beyond, < 1e-13 each).
        a, two_var = self.spacing_nm, 2 * self.column_sigma_nm**2
        reach = int(np.ceil(8 * self.column_sigma_nm / a)) + 1
        nearest = np.floor(coords / a)
        total = np.zeros_like(coords)
        for k in range(-reach, reach + 1):
            total += np.exp(-((coords - (nearest + k + 0.5) * a) ** 2) / two_var)
        return total
