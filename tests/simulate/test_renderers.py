"""Renderers: the incoherent model and abTEM multislice on one pixel grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectscope.simulate import renderers as rd


def test_incoherent_renderer_keeps_each_atoms_weight_and_position():
    # Independent facts: a normalized probe keeps the total Z**n, and both the bilinear
    # spread and a symmetric Gaussian keep the centroid where the atom is.
    positions = np.array([[10.37, 14.81, 0.0]])
    image = rd.render_incoherent(positions, np.array([38]), (30, 30), 1.0, 2.0, exponent=1.7)
    assert image.sum() == pytest.approx(38**1.7, rel=1e-9)
    rows, cols = np.mgrid[0:30, 0:30]
    assert (image * cols).sum() / image.sum() == pytest.approx(10.37, abs=1e-6)
    assert (image * rows).sum() / image.sum() == pytest.approx(14.81, abs=1e-6)
    # The peak's width is the probe's: FWHM 2 px -> sigma 0.849 px (second moment).
    var = (image * (cols - 10.37) ** 2).sum() / image.sum()
    assert math.sqrt(var) == pytest.approx(math.sqrt(0.849**2 + 0.37 * 0.63), rel=0.02)


def test_atom_scale_weights_each_atom():
    weights = rd.render_incoherent(
        np.array([[5.0, 5.0, 0.0], [15.0, 5.0, 0.0]]), np.array([38, 38]), (20, 20), 1.0, 2.0,
        exponent=2.0, atom_scale=np.array([1.0, 0.5]),
    )  # fmt: skip
    assert weights.sum() == pytest.approx(1.5 * 38**2, rel=1e-9)
    assert weights[:, :10].sum() == pytest.approx(2 * weights[:, 10:].sum(), rel=1e-6)
    with pytest.raises(ValueError, match="one per atom"):
        rd.render_incoherent(
            np.zeros((2, 3)), np.array([38, 38]), (8, 8), 1.0, 2.0, atom_scale=np.ones(3)
        )


@pytest.mark.parametrize(
    "pixel, fwhm, message",
    [(1.0, 1e300, "probe FWHM 1e\\+300 is 1e\\+300 pixels, wider than the 16 x 16 image"),
     (1.0, 17.0, "wider than"), (0.0, 1.0, "pixel size"), (1.0, math.nan, "probe FWHM")],
)  # fmt: skip
def test_a_probe_wider_than_the_image_is_named(pixel, fwhm, message):
    # Issue 25, finding 13: a huge probe gave numpy's 'Maximum allowed size exceeded'
    # (a Gaussian kernel of 1e300 pixels).
    with pytest.raises(ValueError, match=message):
        rd.render_incoherent(np.zeros((1, 3)), np.array([8]), (16, 16), pixel, fwhm)


def test_multislice_agrees_with_the_incoherent_model():
    pytest.importorskip("abtem", reason="the multislice renderer needs abTEM")
    from defectscope.simulate.specimen import build_specimen, load_structure

    atoms = load_structure("srtio3")
    specimen = build_specimen(atoms, (0, 0, 1), (7.81, 7.81), 7.81)
    pixel, shape = 0.4, (19, 19)
    settings = rd.Multislice(potential_sampling=0.1, detector_inner=2.5)
    slow = rd.render_multislice(specimen, shape, pixel, 1.2, (0.0, 0.0), settings)
    fast = rd.render_incoherent(specimen.positions, specimen.numbers, shape, pixel, 1.2)
    # Same place, same orientation: the column pattern correlates, and the Sr columns
    # (Z = 38) are brighter than the pure O ones (Z = 8) in both.
    inner = (slice(3, -3), slice(3, -3))
    r = np.corrcoef(slow[inner].ravel(), fast[inner].ravel())[0, 1]
    assert r > 0.8, r
    xy, column = specimen.columns()
    pixel_of = np.rint(xy / pixel).astype(int)
    on_grid = np.all((pixel_of >= 3) & (pixel_of < 16), axis=1)
    kinds = [tuple(sorted(set(specimen.numbers[column == c].tolist()))) for c in range(len(xy))]
    sites = list(zip(pixel_of, kinds, on_grid, strict=True))
    sr = [slow[r, c] for (c, r), k, ok in sites if ok and k == (38,)]
    o = [slow[r, c] for (c, r), k, ok in sites if ok and k == (8,)]
    assert sr and o and min(sr) > max(o)


def test_electron_wavelength_at_200_kv():
    # Tabulated: 2.508 pm at 200 kV (relativistic).
    assert rd.electron_wavelength(200e3) == pytest.approx(0.02508, rel=1e-3)
