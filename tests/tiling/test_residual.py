"""Lattice residual of a window (issue 27): the ideal lattice from its own Bragg peaks,
and descriptors of what is left, checked on lattices whose defects are known."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.tiling.residual import (
    CENTRE_SHARE,
    descriptor_size,
    lattice_reference,
    residual_descriptors,
)

P = 64
PERIOD = 16  # divides the window, so the lattice is exactly periodic in it


def column_lattice(missing=(), added=(), noise=0.03, seed=0, sigma=1.6, heights=(1.0, 0.5)):
    """Two columns per 16 px cell (a bright one and a half-bright one on the diagonal),
    periodic in the window, with the bright columns in ``missing`` (cell row, col)
    taken out, extra bright spots at the pixel positions in ``added``, and Gaussian
    noise of ``noise`` (a recording has some; a noise-free one has no Fourier floor)."""
    yy, xx = np.mgrid[0:P, 0:P].astype(np.float64)

    def spot(r, c, h, s):
        # Periodic images of the spot, so the lattice wraps around the window exactly.
        dy = (yy - r + P / 2) % P - P / 2
        dx = (xx - c + P / 2) % P - P / 2
        return h * np.exp(-(dy**2 + dx**2) / (2 * s**2))

    image = np.full((P, P), 0.1)
    for i in range(P // PERIOD):
        for j in range(P // PERIOD):
            if (i, j) not in missing:
                image += spot(i * PERIOD + 4, j * PERIOD + 4, heights[0], sigma)
            image += spot(i * PERIOD + 12, j * PERIOD + 12, heights[1], sigma)
    for r, c in added:
        image += spot(r, c, 0.8, 1.0)
    return image + np.random.default_rng(seed).normal(0.0, noise, image.shape)


def zscored(x):
    return (x - x.mean()) / x.std()


def test_a_perfect_lattice_is_its_own_reference():
    window = column_lattice(noise=0.0)
    reference = lattice_reference(window)[0]
    assert np.abs(zscored(window) - reference).max() < 1e-4
    # With noise, the reference keeps the lattice and leaves the noise.
    noisy = column_lattice(noise=0.03)
    residual = zscored(noisy) - lattice_reference(noisy)[0]
    expected = 0.03 / (noisy.std())
    assert 0.8 * expected < residual.std() < 1.2 * expected


def test_a_missing_column_is_the_deepest_pit_and_sits_on_a_column():
    window = column_lattice(missing=[(1, 2)])  # the bright column at (20, 36)
    residual = zscored(window) - lattice_reference(window)[0]
    row, col = np.unravel_index(np.argmin(residual), residual.shape)
    assert abs(row - 20) <= 1 and abs(col - 36) <= 1
    d = residual_descriptors(window)[0]
    # Per scale: 2 added, 2 missing (noise units), then the reference at each.
    for scale in range(3):
        block = d[scale * 8 : scale * 8 + 8]
        added, missing, ref_missing = block[:2], block[2:4], block[6:8]
        assert missing[0] > 2 * max(added[0], 1.0), (scale, block)
        assert ref_missing[0] > 1.0  # on a bright column of the ideal lattice
    assert d.shape == (descriptor_size(P, P),)


def test_an_added_spot_between_columns_is_the_strongest_peak_and_sits_off_columns():
    window = column_lattice(added=[(28, 20)])  # between the columns of the cell
    d = residual_descriptors(window)[0]
    block = d[8:16]  # 1 px smoothing
    assert block[0] > 3 * max(block[2], 1.0)
    assert block[4] < 0.5  # the ideal lattice is dark there
    bright = residual_descriptors(column_lattice(missing=[(1, 2)]))[0][8:16]
    assert block[4] < bright[6] - 1.0  # a missing column sat on bright lattice


def test_descriptors_ignore_gain_offset_and_turns():
    noisy = column_lattice(missing=[(1, 2)], added=[(44, 52)])
    base = residual_descriptors(noisy)[0]
    same = residual_descriptors(noisy * 7.5 + 300.0)[0]
    np.testing.assert_allclose(same, base, rtol=1e-4, atol=1e-4)
    for turned in (np.rot90(noisy), np.fliplr(noisy), np.rot90(noisy, 2).T):
        got = residual_descriptors(np.ascontiguousarray(turned))[0]
        np.testing.assert_allclose(got, base, rtol=1e-3, atol=1e-3)


def test_a_batch_equals_its_windows_one_by_one():
    windows = np.stack([column_lattice(missing=[(i % 4, 1)], seed=i) for i in range(3)])
    batch = residual_descriptors(windows.astype(np.float32))
    for k in range(3):
        np.testing.assert_allclose(
            batch[k], residual_descriptors(windows[k].astype(np.float32))[0], rtol=1e-5, atol=1e-5
        )


def test_flat_and_uint_windows():
    flat = residual_descriptors(np.full((2, P, P), 7, dtype=np.uint16))
    assert np.isfinite(flat).all() and flat.shape == (2, descriptor_size(P, P))
    big_endian = column_lattice().astype(">f8")
    np.testing.assert_allclose(
        residual_descriptors(big_endian), residual_descriptors(column_lattice()), atol=1e-6
    )


@pytest.mark.parametrize(
    "windows, match",
    [
        (np.zeros((2, 2, P, P)), "windows must be"),
        (np.zeros((2, 10, P)), "too small"),
        (np.array([[["a"] * P] * P]), "dtype"),
        (np.full((1, P, P), np.nan), "NaN"),
        (np.full((1, P, P), np.inf), "NaN or infinite"),
    ],
)
def test_bad_windows_are_refused(windows, match):
    with pytest.raises(ValueError, match=match):
        residual_descriptors(windows)


@pytest.mark.parametrize("factor", [0, 1.0, -3, True, float("nan"), float("inf"), "10"])
def test_bad_peak_factors_are_refused(factor):
    with pytest.raises(ValueError, match="peak_factor"):
        residual_descriptors(column_lattice(), peak_factor=factor)
    with pytest.raises(ValueError, match="peak_factor"):
        lattice_reference(column_lattice(), peak_factor=factor)


def test_the_centre_describes_the_window_centre_and_not_a_defect_at_its_edge():
    """With ``centre``, a column missing at the window's edge leaves the deepest pit of
    the perfect lattice (the column is the centre of another window) and one missing at
    the centre stands out; without ``centre``, both do. (The edge column still shifts
    the rebuilt lattice a little, so the added maxima rise either way.)"""
    perfect, edge, middle = (
        column_lattice(missing=m, seed=1) for m in ((), [(0, 1)], [(2, 2)])
    )  # missing bright columns at (4, 20) and (36, 36); the centre square is 20-43
    whole = residual_descriptors(np.stack([perfect, edge, middle]))
    centred = residual_descriptors(np.stack([perfect, edge, middle]), centre=CENTRE_SHARE)
    missing = slice(2, 3)  # the deepest pit, unsmoothed, in noise units
    assert whole[1, missing] > 3 * whole[0, missing]  # the edge column counts without
    assert whole[2, missing] > 3 * whole[0, missing]
    assert centred[2, missing] > 3 * centred[0, missing]
    assert abs(centred[1, missing] - centred[0, missing]) < 0.2 * centred[0, missing] + 0.5
    # Its extremes are those of the central square alone: a missing column moved within
    # it keeps the strongest ones (the second ones are noise, which differs by place).
    moved = residual_descriptors(column_lattice(missing=[(1, 2)], seed=1), centre=CENTRE_SHARE)
    strongest = [8 * scale + k for scale in range(3) for k in (0, 2, 6)]  # and its place
    np.testing.assert_allclose(moved[0, strongest], centred[2, strongest], rtol=0.15, atol=0.3)
    assert descriptor_size(P, P) == centred.shape[1]


@pytest.mark.parametrize(
    "shape, centre, borders",
    [
        ((64, 64), CENTRE_SHARE, (20, 20)),  # the central 24 px
        ((64, 64), None, (4, 4)),
        ((63, 65), CENTRE_SHARE, (19, 20)),  # 25 of 63 (rounded side, split evenly)
        ((16, 128), CENTRE_SHARE, (5, 40)),
        ((13, 13), CENTRE_SHARE, (4, 4)),  # never closer to the edge than BORDER
        ((64, 64), 1.0, (4, 4)),
        ((64, 64), 0.01, (29, 29)),  # at least EXTREME_SIZE px inside
    ],
)
def test_the_central_square(shape, centre, borders):
    from defectscope.tiling import residual

    assert residual._borders(*shape, centre) == borders


def test_bulk_beside_a_defect_keeps_it_outside_the_centre():
    """simulate's Bulk patches keep defects at least ``max(P // 4, P // 8 + 8)`` px from
    their centre (max norm): a few pixels outside the central square, at every size."""
    from defectscope.tiling import residual

    for size in (16, 32, 64, 128):
        clearance = max(size // 4, size // 8 + 8)
        border = residual._borders(size, size, CENTRE_SHARE)[0]
        assert clearance - (size / 2 - border) >= 3, size


@pytest.mark.parametrize(
    "centre", [0.0, -0.5, 1.5, float("nan"), True, "0.3", b"0.3", np.True_, 10**400]
)
def test_bad_centres_are_refused(centre):
    with pytest.raises(ValueError, match="centre must be a share"):
        residual_descriptors(column_lattice(), centre=centre)


@pytest.mark.parametrize(
    "beside, centre", [(False, None), (True, CENTRE_SHARE)], ids=["bulk-clear", "bulk-beside"]
)
def test_a_left_out_defect_kind_is_new_and_a_trained_one_is_not(beside, centre):
    """Simulated SrTiO3 [001] with Sr and Ti vacancies and Nb on Ti: a density of the
    residual descriptors fitted without the substitution flags it, and calls held-out
    windows of the trained kinds unknown at about its quantile's rate. With half the
    ``Bulk`` patches cut beside a defect, the extremes are taken in the patch centres
    (as a simulated training does): over the whole patch the density learns that a
    defect is ``Bulk`` (AUROC 0.815, 8 % of the substitution unknown)."""
    from sklearn.metrics import roc_auc_score

    from defectscope.artifacts.density import fit_density
    from defectscope.simulate.dataset import cut_patches, simulate_frame
    from defectscope.studies.domain_shift import study_settings

    settings = study_settings(size=384, seed=3)
    rng = np.random.default_rng(0)
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    for k in range(30):
        frame, record = simulate_frame(settings, k)
        part = "train" if k < 20 else "validation" if k < 24 else "test"
        parts[part] += cut_patches(frame, record["defects"], P, 4, rng, beside)
    new = "Substitution_Ti_Nb"
    known = sorted({kind for kind, _ in parts["train"]} - {new})

    def split(part, keep_new):
        pairs = [(k, p) for k, p in parts[part] if keep_new or k != new]
        kinds = np.array([k for k, _ in pairs])
        return kinds, residual_descriptors(np.stack([p for _, p in pairs]), centre=centre)

    train_kinds, train = split("train", False)
    _, validation = split("validation", False)
    test_kinds, test = split("test", True)
    labels = np.array([known.index(k) for k in train_kinds])
    density = fit_density(train, labels, len(known), held_out=validation, quantile=0.99)
    distance, _, unknown = density.score(test)
    is_new = test_kinds == new
    assert is_new.sum() >= 20 and (~is_new).sum() >= 60
    assert roc_auc_score(is_new, distance) >= 0.9  # 0.947 / 0.991 measured (random: 0.5)
    assert unknown[~is_new].mean() <= 0.06
    assert unknown[is_new].mean() >= 0.25  # 25 times the rate of the trained kinds


@pytest.mark.parametrize("shape", [(64, 64), (45, 61), (33, 32)])
def test_fast_paths_equal_their_plain_definitions(shape):
    # The residual's shortcuts (half-plane FFTs, smoothing as matrix products) against
    # the operations they stand for: scipy's gaussian_filter and full-plane FFTs.
    from scipy import fft
    from scipy.ndimage import gaussian_filter

    from defectscope.tiling import residual

    rng = np.random.default_rng(3)
    batch = np.stack([column_lattice(seed=s)[: shape[0], : shape[1]] for s in range(5)])
    batch = (batch + rng.normal(0, 0.1, batch.shape)).astype(np.float32)
    for sigma in (1.0, 2.0):
        np.testing.assert_allclose(
            residual._smooth(batch, sigma), gaussian_filter(batch, (0, sigma, sigma)), atol=1e-5
        )
    # The reference: the half-plane mask applied to the whole plane gives the same real
    # image, so the mask is Hermitian-symmetric as a real lattice's must be.
    windows = residual._as_windows(batch)
    reference = residual._reference(windows, residual.PEAK_FACTOR)
    spectrum = fft.fft2(windows, axes=(1, 2))
    # A kept bin holds the window's coefficient, a dropped one (rounding aside) nothing.
    kept = np.abs(fft.fft2(reference, axes=(1, 2))) > 0.5 * np.abs(spectrum)
    whole = fft.ifft2(spectrum * kept, axes=(1, 2))
    assert np.abs(whole.imag).max() < 1e-4
    np.testing.assert_allclose(reference, whole.real, atol=1e-4)
    # The radial power spectrum: ring means over the whole plane.
    height, width = shape
    taper = np.outer(np.hanning(height), np.hanning(width))
    power = np.abs(fft.fft2(batch * taper, axes=(1, 2))) ** 2
    fy = np.fft.fftfreq(height)[:, None] * height * min(shape) / height
    fx = np.fft.fftfreq(width)[None, :] * width * min(shape) / width
    rings = np.rint(np.hypot(fy, fx)).astype(int)
    expected = np.stack(
        [power[:, rings == r].mean(axis=1) for r in range(1, min(shape) // 2 + 1)], axis=1
    )
    np.testing.assert_allclose(
        residual._radial_power(batch), np.log(expected + 1e-6), rtol=1e-4, atol=1e-4
    )


def _plain_reference(windows, peak_factor):
    """The ideal lattice as its docstring defines it, on the whole Fourier plane."""
    from scipy import fft
    from scipy.ndimage import maximum_filter

    from defectscope.tiling.residual import MIN_PEAK_RADIUS

    height, width = windows.shape[1:]
    spectrum = fft.fft2(windows, axes=(1, 2))
    amplitude = np.abs(spectrum)
    fy = np.fft.fftfreq(height)[:, None] * min(height, width)
    fx = np.fft.fftfreq(width)[None, :] * min(height, width)
    beyond = np.hypot(fy, fx) >= MIN_PEAK_RADIUS
    even = np.zeros((height, width), bool)
    even[::2, ::2] = True
    floor = np.median(amplitude[:, beyond & even], axis=1)[:, None, None]
    peaks = beyond & (amplitude > peak_factor * floor)
    peaks &= amplitude >= maximum_filter(amplitude, size=(1, 3, 3), mode="wrap")
    mask = peaks.copy()
    for axis in (1, 2):
        mask |= np.roll(peaks, 1, axis) | np.roll(peaks, -1, axis)
    mask[:, 0, 0] = True
    return fft.ifft2(spectrum * mask, axes=(1, 2)).real


def _plain_extremes(image, size, border, count):
    """The ``count`` strongest maxima of ``image`` inside ``border``, each blanking its
    ``size`` square before the next: one window, in plain loops."""
    values = np.full(image.shape, -np.inf)
    values[border:-border, border:-border] = image[border:-border, border:-border]
    found = []
    for _ in range(count):
        y, x = np.unravel_index(np.argmax(values), values.shape)
        found.append((values[y, x], y, x))
        reach = size // 2
        values[max(y - reach, 0) : y + reach + 1, max(x - reach, 0) : x + reach + 1] = -np.inf
    return found


@pytest.mark.parametrize("shape", [(64, 64), (45, 61), (33, 32)])
def test_peaks_and_extremes_equal_their_plain_definitions(shape):
    # The half-plane peak search (mirrored bins, neighbours read across the half's
    # edge) and the padded, vectorized extremes against whole-plane and loop versions.
    from defectscope.tiling import residual

    rng = np.random.default_rng(5)
    batch = np.stack(
        [column_lattice(missing=[(1, 2)], seed=s)[: shape[0], : shape[1]] for s in range(6)]
    )
    # Waves whose Fourier peaks sit at the rfft2 half's edges (columns 1, W // 2 - 1 and
    # W // 2, and their mirrors past the half), where a peak's neighbours cross over.
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for ky, kx in ((5, 1), (3, shape[1] // 2 - 1), (7, shape[1] // 2)):
        batch = batch + 0.3 * np.cos(2 * np.pi * (ky * yy / shape[0] + kx * xx / shape[1]))
    batch = (batch + rng.normal(0, 0.05, batch.shape)).astype(np.float32)
    windows = residual._as_windows(batch)
    reference = residual._reference(windows, residual.PEAK_FACTOR)
    np.testing.assert_allclose(
        reference, _plain_reference(windows, residual.PEAK_FACTOR), atol=1e-4
    )
    image = windows - reference
    noise = np.ones((len(image), 1), np.float32)
    for sign in (1.0, -1.0):
        got = residual._extremes(image, reference, noise, sign=sign)
        for i in range(len(image)):
            plain = _plain_extremes(
                sign * image[i], residual.EXTREME_SIZE, residual.BORDER, residual.EXTREMES
            )
            values = [v for v, _, _ in plain]
            at_reference = [reference[i, y, x] for _, y, x in plain]
            np.testing.assert_allclose(got[i], values + at_reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, offset, spread",
    [
        (np.float32, 30000.0, 120.0),
        (np.uint16, 30000.0, 120.0),
        (np.float64, 30000.0, 120.0),
        (np.int32, 30000.0, 120.0),
        # A large offset over a small spread: the float32 mean's rounding is not left
        # in the pixels (it would be a mean of 0.03 / spread).
        (np.float32, 1e6, 1.0),
        (np.uint16, 30000.0, 3.0),
        # Spreads whose squares pass float32's range, and tiny ones.
        (np.float32, 0.0, 1e20),
        (np.float32, 0.0, 1e-25),
    ],
)
def test_zscore_equals_its_float64_definition(dtype, offset, spread):
    # Float32 and narrower windows are centred in float32 (sums in float64), wider ones
    # in float64: either way the z-score of the float64 definition, flat windows zeros.
    from defectscope.tiling import residual

    rng = np.random.default_rng(11)
    batch = offset + spread * rng.standard_normal((7, 45, 61))
    batch[3] = offset + spread
    if np.dtype(dtype).kind in "iu":
        batch = np.rint(batch)
    batch = batch.astype(dtype)
    wide = batch.astype(np.float64)
    mean = wide.mean(axis=(1, 2), keepdims=True)
    std = wide.std(axis=(1, 2), keepdims=True)
    want = (wide - mean) / np.where(std > 0, std, 1.0)
    got = residual._as_windows(batch)
    assert got.dtype == np.float32 and got.shape == batch.shape
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert not got[3].any()


@pytest.mark.parametrize("count", [1, 2, 1023, 1024])
def test_row_median_is_numpys(count):
    from defectscope.tiling import residual

    values = np.random.default_rng(count).random((9, count)).astype(np.float32)
    np.testing.assert_array_equal(residual._row_median(values), np.median(values, axis=1))


def test_descriptors_do_not_depend_on_the_threads(monkeypatch):
    # A batch is split over THREADS threads; every window is computed on its own, so
    # the split (and its BLAS limit) changes nothing.
    from defectscope.tiling import residual

    windows = np.stack(
        [column_lattice(missing=[(k % 4, k % 3)], added=[(k, 30)], seed=k) for k in range(150)]
    ).astype(np.float32)
    monkeypatch.setattr(residual, "MIN_WINDOWS_PER_THREAD", 16)
    split = residual_descriptors(windows)
    monkeypatch.setattr(residual, "THREADS", 1)
    np.testing.assert_allclose(residual_descriptors(windows), split, rtol=1e-6, atol=1e-6)


def test_zscore_of_float32_pixels_whose_differences_overflow_float32():
    # 9 in 10 pixels at -2e38, the rest at 3e38: pixel minus mean passes float32's range,
    # so the float32 attempt overflows and the window is centred in float64 instead.
    from defectscope.tiling import residual

    window = np.full((1, 20, 20), -2e38, dtype=np.float32)
    window[0, ::10] = 3e38
    wide = window.astype(np.float64)
    want = (wide - wide.mean()) / wide.std()
    got = residual._as_windows(window)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
