"""Synthetic STEM-like images made by the tests themselves."""

from __future__ import annotations

import numpy as np

from defectscope.io.datasets import PatchSet


def lattice(
    shape: tuple[int, int],
    spacing: float = 8.0,
    sigma: float = 1.5,
    vacancies: list[tuple[int, int]] = (),
    noise: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """A square lattice of Gaussian atom columns, with columns removed at ``vacancies``.

    Positions in ``vacancies`` are lattice indices (row, col); returns float32 0..1.
    """
    rng = np.random.default_rng(seed)

    def profile(length: int) -> np.ndarray:
        # Sum of 1-D Gaussians at every column centre along one axis.
        centres = (np.arange(int(length / spacing) + 1) + 0.5) * spacing
        t = np.arange(length, dtype=np.float64)[:, None]
        return np.exp(-((t - centres[None]) ** 2) / (2 * sigma**2)).sum(axis=1)

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


def toy_patches(n_per_class: int = 12, seed: int = 0, noise: float = 0.05) -> PatchSet:
    """Class 0: clean lattice; class 1: lattice with a vacancy in the centre."""
    images, labels = [], []
    vacancy = [(3, 3), (3, 4), (4, 3), (4, 4)]
    for i in range(n_per_class):
        images.append(lattice((64, 64), noise=noise, seed=seed * 1000 + i))
        labels.append(0)
        images.append(lattice((64, 64), vacancies=vacancy, noise=noise, seed=seed * 1000 + 500 + i))
        labels.append(1)
    images = (np.stack(images) * 200).clip(0, 255).astype(np.uint8)
    return PatchSet(
        images, np.array(labels), ["Bulk", "Vacancy"], [f"p{i}" for i in range(len(labels))]
    )


def acquired_lattice(
    shape: tuple[int, int],
    clusters: list[tuple[int, int]],
    spacing: float = 8.0,
    dose: float = 60.0,
    jitter: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A lattice frame as an instrument records it, with 2x2 vacancy clusters.

    ``clusters`` are lattice indices (row, col) of each cluster's top-left column;
    ``dose`` is the expected electron count at a column's peak (Poisson shot noise);
    ``jitter`` the standard deviation, in pixels, of each scan line's offset along x.
    Returns the uint8 frame and the clusters' centres in pixels, shape (n, 2).
    """
    rng = np.random.default_rng(seed)
    vacancies = [(i + di, j + dj) for i, j in clusters for di in (0, 1) for dj in (0, 1)]
    clean = lattice(shape, spacing=spacing, vacancies=vacancies, noise=0.0, seed=seed)
    # Scan-line jitter: each row is read at a slightly shifted x.
    x = np.arange(shape[1], dtype=np.float64)
    shifts = rng.normal(0.0, jitter, shape[0])
    jittered = np.stack([np.interp(x + s, x, row) for s, row in zip(shifts, clean, strict=True)])
    counts = rng.poisson(np.clip(jittered, 0, None) * dose) / dose
    frame = (counts * 200).clip(0, 255).astype(np.uint8)
    centres = np.array([((i + 1) * spacing, (j + 1) * spacing) for i, j in clusters], float)
    return frame, centres.reshape(-1, 2)
