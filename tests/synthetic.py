"""Synthetic STEM-like images for the tests: thin names over
:mod:`defectscope.simulate.lattice`, the one synthetic-lattice generator (the benchmarks
and the Nion closed loop use it too)."""

from __future__ import annotations

import numpy as np

from defectscope.io.datasets import PatchSet
from defectscope.simulate.lattice import acquired_lattice as _acquired_lattice
from defectscope.simulate.lattice import lattice_image, toy_patch_set


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
    See :func:`defectscope.simulate.lattice.lattice_image`.
    """
    return lattice_image(shape, spacing, sigma, vacancies, noise, seed)


def toy_patches(n_per_class: int = 12, seed: int = 0, noise: float = 0.05) -> PatchSet:
    """Class 0: clean lattice; class 1: lattice with a vacancy in the centre.

    See :func:`defectscope.simulate.lattice.toy_patch_set`.
    """
    return toy_patch_set(n_per_class, seed, noise)


def acquired_lattice(
    shape: tuple[int, int],
    clusters: list[tuple[int, int]],
    spacing: float = 8.0,
    dose: float = 60.0,
    jitter: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A lattice frame as an instrument records it, with 2x2 vacancy clusters; the uint8
    frame and the clusters' centres in pixels, shape (n, 2).

    See :func:`defectscope.simulate.lattice.acquired_lattice`.
    """
    return _acquired_lattice(shape, clusters, spacing, dose, jitter, seed)
