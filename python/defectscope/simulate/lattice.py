"""Synthetic lattices: square grids of Gaussian atom columns with vacancies at known places.

The one generator of synthetic lattice frames, for the tests, the benchmarks and the
Nion closed loop (the physical simulation with crystals, renderers and the instrument is
:mod:`~defectscope.simulate.dataset`). Every image here is a sum of 1-D column profiles
(:func:`column_profile`, separable on a square grid) less the removed columns:

- :class:`LatticeSample` with :class:`ScanField`: a specimen in nanometres (y down,
  x right) that a simulated scan renders at any field of view, centre and rotation, so
  a test can check that a closed loop went where the defect is;
- :func:`lattice_image`: the same lattice on a frame's pixel grid (pixel units), with
  additive Gaussian noise; :func:`acquired_lattice` adds scan-line jitter and shot noise
  and returns the vacancy clusters' centres; :func:`toy_patch_set` cuts a two-class
  patch set (clean, vacancy) from such lattices.

Each is deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from defectscope.io.datasets import PatchSet


def column_profile(
    coords: np.ndarray, spacing: float, sigma: float, columns: Iterable[int] | None = None
) -> np.ndarray:
    """Sum of 1-D Gaussians ``exp(-(t - c)² / 2σ²)`` at the column centres
    ``c = (k + 0.5) * spacing``, evaluated at every ``t`` of ``coords``.

    A square grid of isotropic Gaussian columns is the product of two such profiles.

    Parameters
    ----------
    coords : ndarray
        Positions along one axis (any shape), in the units of ``spacing``.
    spacing, sigma : float
        Column spacing and a column's standard deviation.
    columns : iterable of int, optional
        The indices ``k`` present (a lattice that starts and ends somewhere); ``None``:
        an endless lattice, every column within 8 sigma (beyond, each adds < 1e-13).

    Returns
    -------
    ndarray of float64, shaped like ``coords``
    """
    coords = np.asarray(coords, dtype=np.float64)
    two_var = 2 * sigma**2
    if columns is not None:
        centres = (np.asarray(list(columns), dtype=np.float64) + 0.5) * spacing
        return np.exp(-((coords[..., None] - centres) ** 2) / two_var).sum(axis=-1)
    reach = int(np.ceil(8 * sigma / spacing)) + 1
    nearest = np.floor(coords / spacing)
    total = np.zeros_like(coords)
    for k in range(-reach, reach + 1):
        total += np.exp(-((coords - (nearest + k + 0.5) * spacing) ** 2) / two_var)
    return total


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
        return column_profile(coords, self.spacing_nm, self.column_sigma_nm)


def lattice_image(
    shape: tuple[int, int],
    spacing: float = 8.0,
    sigma: float = 1.5,
    vacancies: Iterable[tuple[int, int]] = (),
    noise: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """A square lattice of Gaussian atom columns on a pixel grid, columns removed at
    ``vacancies``, plus Gaussian noise.

    Pixel ``(i, j)`` samples the point ``(i, j)``; columns sit at
    ``((m + 0.5) * spacing, (n + 0.5) * spacing)`` for ``m, n >= 0`` (the lattice starts
    at the frame's top-left corner). Lengths are in pixels.

    Parameters
    ----------
    shape : (int, int)
    spacing, sigma : float
        Column spacing and a column's standard deviation, pixels.
    vacancies : iterable of (int, int)
        Lattice indices ``(m, n)`` of the columns removed.
    noise : float
        Standard deviation of the additive Gaussian noise (a column's peak is 1).
    seed : int
        Seeds the noise: the same arguments give the same image.

    Returns
    -------
    ndarray of float32, shape ``shape``, about 0..1
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive sides, got {tuple(shape)}")
    if not (np.isfinite(spacing) and spacing > 0 and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"spacing {spacing} and sigma {sigma} must be positive")
    rng = np.random.default_rng(seed)

    def profile(length: int) -> np.ndarray:
        # The lattice's columns along one axis: those from the edge to one past it.
        t = np.arange(length, dtype=np.float64)
        return column_profile(t, spacing, sigma, range(int(length / spacing) + 1))

    # A product grid of isotropic Gaussians is separable: an outer product of profiles.
    image = np.outer(profile(shape[0]), profile(shape[1]))
    reach = int(np.ceil(6 * sigma))
    for i, j in set(vacancies):
        cy, cx = (i + 0.5) * spacing, (j + 0.5) * spacing
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, shape[0])
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] -= np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    image = image.astype(np.float32)
    image += rng.normal(0, noise, shape).astype(np.float32)
    return image


def acquired_lattice(
    shape: tuple[int, int],
    clusters: Iterable[tuple[int, int]],
    spacing: float = 8.0,
    dose: float = 60.0,
    jitter: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A lattice frame as an instrument records it, with 2x2 vacancy clusters.

    Parameters
    ----------
    shape : (int, int)
    clusters : iterable of (int, int)
        Lattice indices ``(m, n)`` of each cluster's top-left column.
    spacing : float
        Column spacing, pixels (columns as in :func:`lattice_image`).
    dose : float
        Expected electron count at a column's peak (Poisson shot noise).
    jitter : float
        Standard deviation, in pixels, of each scan line's offset along x.
    seed : int

    Returns
    -------
    frame : ndarray of uint8, shape ``shape``
    centres : ndarray, shape (n, 2)
        The clusters' centres ``(row, col)`` in pixels.
    """
    if not (np.isfinite(dose) and dose > 0 and np.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"dose {dose} must be positive and jitter {jitter} >= 0")
    clusters = list(clusters)
    rng = np.random.default_rng(seed)
    vacancies = [(i + di, j + dj) for i, j in clusters for di in (0, 1) for dj in (0, 1)]
    clean = lattice_image(shape, spacing=spacing, vacancies=vacancies, noise=0.0, seed=seed)
    # Scan-line jitter: each row is read at a slightly shifted x.
    x = np.arange(shape[1], dtype=np.float64)
    shifts = rng.normal(0.0, jitter, shape[0])
    jittered = np.stack([np.interp(x + s, x, row) for s, row in zip(shifts, clean, strict=True)])
    counts = rng.poisson(np.clip(jittered, 0, None) * dose) / dose
    frame = (counts * 200).clip(0, 255).astype(np.uint8)
    centres = np.array([((i + 1) * spacing, (j + 1) * spacing) for i, j in clusters], float)
    return frame, centres.reshape(-1, 2)


def toy_patch_set(n_per_class: int = 12, seed: int = 0, noise: float = 0.05) -> PatchSet:
    """A two-class uint8 patch set of 64 x 64 lattices: ``Bulk`` (clean) and ``Vacancy``
    (the 2x2 columns around the centre removed), ``n_per_class`` each, interleaved.

    Each patch has its own noise seed (from ``seed``), so the set is reproducible.
    """
    images, labels = [], []
    vacancy = [(3, 3), (3, 4), (4, 3), (4, 4)]
    for i in range(n_per_class):
        images.append(lattice_image((64, 64), noise=noise, seed=seed * 1000 + i))
        labels.append(0)
        images.append(
            lattice_image((64, 64), vacancies=vacancy, noise=noise, seed=seed * 1000 + 500 + i)
        )
        labels.append(1)
    images = (np.stack(images) * 200).clip(0, 255).astype(np.uint8)
    return PatchSet(
        images, np.array(labels), ["Bulk", "Vacancy"], [f"p{i}" for i in range(len(labels))]
    )
