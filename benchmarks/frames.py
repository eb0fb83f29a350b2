"""Synthetic STEM frames for the benchmarks (from the package's lattice generator)."""

from __future__ import annotations

import numpy as np

from defectscope.simulate.lattice import lattice_image


def stem_frame(size: int) -> np.ndarray:
    """A uint16 lattice frame of side ``size`` with a few vacancies."""
    vacancies = [(i, j) for i in range(3, size // 8, 17) for j in range(5, size // 8, 23)]
    return (lattice_image((size, size), vacancies=vacancies, seed=size) * 20000 + 2000).astype(
        np.uint16
    )
