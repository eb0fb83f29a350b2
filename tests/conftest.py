"""Shared fixtures: synthetic STEM-like lattices and the optional public data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import lattice, toy_patches

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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small trained Bulk/Vacancy model directory shared by the runtime tests."""
    from defectscope.train import TrainConfig, save_training, train_classifier

    config = TrainConfig(epochs=4, batch_size=8, precision="fp32")
    result = train_classifier(toy_patches(10), None, config, progress=False)
    out = tmp_path_factory.mktemp("models") / "toy"
    save_training(out, result, config, extra_record={"calibration": {"temperature": 1.5}})
    return out
