"""The synthetic-lattice generator the tests, benchmarks and Nion loop share."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.simulate import lattice as lt


def _columns_summed(shape, spacing, sigma, missing=()):
    """Reference: every column of the lattice as one 2-D Gaussian, summed directly."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    image = np.zeros(shape)
    for m in range(int(shape[0] / spacing) + 1):
        for n in range(int(shape[1] / spacing) + 1):
            if (m, n) not in missing:
                cy, cx = (m + 0.5) * spacing, (n + 0.5) * spacing
                image += np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2))
    return image


def test_lattice_image_is_a_sum_of_columns():
    shape, missing = (50, 43), {(2, 2), (3, 1)}
    image = lt.lattice_image(shape, spacing=7.0, sigma=1.3, vacancies=missing, noise=0.0)
    assert image.dtype == np.float32 and image.shape == shape
    # float32 rounding of values near 1, and removed columns cut at 6 sigma (e^-18).
    np.testing.assert_allclose(image, _columns_summed(shape, 7.0, 1.3, missing), atol=1e-6)


def test_noise_is_seeded():
    a, b = lt.lattice_image((32, 32), seed=4), lt.lattice_image((32, 32), seed=4)
    c = lt.lattice_image((32, 32), seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    clean = lt.lattice_image((32, 32), noise=0.0)
    assert abs(float((a - clean).std()) - 0.05) < 0.01  # the noise asked for


def test_the_nion_specimen_is_the_same_lattice():
    # A LatticeSample in pixel units, scanned so that pixel (i, j) samples (i, j), is
    # the pixel-grid lattice (away from the top and left edges, where the pixel grid's
    # lattice starts and the specimen's goes on).
    shape = (60, 52)
    field = lt.ScanField(((shape[0] - 1) / 2, (shape[1] - 1) / 2), shape, shape)
    sample = lt.LatticeSample(
        spacing_nm=8.0, column_sigma_nm=1.5, vacancies_nm=((20.0, 28.0),),
        vacancy_radius_nm=3.0, peak_counts=1.0, background_counts=0.0,
    )  # fmt: skip
    scanned = sample.render(field)
    grid = lt.lattice_image(shape, 8.0, 1.5, vacancies=[(2, 3)], noise=0.0)
    assert sample.missing_columns() == {(2, 3)}
    np.testing.assert_allclose(scanned[8:, 8:], grid[8:, 8:], atol=1e-5)


def test_acquired_lattice_and_toy_patches():
    frame, centres = lt.acquired_lattice((96, 96), [(3, 4)], dose=1e6, jitter=0.0, seed=2)
    assert frame.dtype == np.uint8 and centres.tolist() == [[32.0, 40.0]]
    # The 2x2 cluster is dark at its centre; a clean column is bright.
    assert frame[32, 40] < 20 and frame[12, 12] > 150
    patches = lt.toy_patch_set(3, seed=1)
    assert patches.images.shape == (6, 64, 64) and patches.labels.tolist() == [0, 1] * 3
    assert patches.classes == ["Bulk", "Vacancy"]
    assert np.array_equal(patches.images, lt.toy_patch_set(3, seed=1).images)
    with pytest.raises(ValueError, match="spacing"):
        lt.lattice_image((8, 8), spacing=0.0)
