"""Shared fixtures: synthetic STEM-like lattices and the optional public data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import lattice

REPO = Path(__file__).resolve().parents[1]
PUBLIC_DATA = REPO.parent / "shared" / "datasets" / "defect-classification-in-stem-images"


@pytest.fixture
def small_frame() -> np.ndarray:
    return (lattice((96, 120), vacancies=[(5, 7)]) * 30000 + 1000).astype(np.uint16)


@pytest.fixture(scope="session")
def public_data() -> Path:
    if not (PUBLIC_DATA / "Image Data").is_dir():
        pytest.skip(f"public STEM data not found at {PUBLIC_DATA}")
    return PUBLIC_DATA
