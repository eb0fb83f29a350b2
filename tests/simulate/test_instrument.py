"""The instrument: scan distortions, noise, and positions carried through them."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.simulate import instrument as ins
from defectscope.simulate.renderers import render_incoherent


def test_acquired_positions_follow_drift_and_jitter():
    # One bright spot per place; after drift and jitter, each spot's centroid in the
    # recorded frame is where to_frame says.
    margin, shape = 12, (200, 200)
    spots = np.array([[40.0, 50.0], [150.0, 60.0], [100.0, 170.0], [180.0, 180.0]])
    positions = np.column_stack([spots[:, 1] + margin, spots[:, 0] + margin, np.zeros(4)])
    clean = render_incoherent(
        positions, np.full(4, 50), (shape[0] + 2 * margin, shape[1] + 2 * margin), 1.0, 3.0
    )
    instrument = ins.Instrument(
        dose=1e6, jitter=0.4, drift=(5.0, 8.0), gradient=0.0, gain=1.0, offset=0.0, read_noise=0
    )
    frame, to_frame = ins.acquire(clean, margin, instrument, np.random.default_rng(1))
    assert frame.shape == shape and frame.dtype == np.uint16
    from scipy import ndimage

    labels, n = ndimage.label(frame > frame.max() * 0.2)
    assert n == 4
    found = np.array(ndimage.center_of_mass(frame.astype(float), labels, range(1, 5)))
    expected = np.array([to_frame(r, c) for r, c in spots])
    distance = np.linalg.norm(found[:, None] - expected[None], axis=2).min(axis=1)
    assert distance.max() < 0.6, distance
    # Without distortions the truth would be the spots themselves: the drift matters.
    assert np.linalg.norm(expected - spots, axis=1).max() > 4


def test_a_dose_past_what_can_be_drawn_is_named():
    # Issue 25, finding 13: '--dose 1e300' (or a bright pixel far above the image's
    # 99.9th percentile) ended in numpy's 'lam value too large'.
    with pytest.raises(ValueError, match="dose 1e\\+300 is over the limit of 1e\\+12"):
        ins.Instrument(dose=1e300).check()
    clean = np.zeros((40, 40))
    clean[20, 20] = 1.0  # one lit pixel: the 99.9th percentile is 0, the floor 1e-12
    quiet = ins.Instrument(dose=1e9, jitter=0.0, drift=(0.0, 0.0), gradient=0.0)
    with pytest.raises(ValueError, match="dose 1e\\+09: the brightest pixel expects"):
        ins.acquire(clean, 2, quiet, np.random.default_rng(0))


def test_instrument_checks_name_the_setting():
    for instrument, message in [
        (ins.Instrument(dose=float("inf")), "finite"),
        (ins.Instrument(jitter=-1.0), "jitter"),
        (ins.Instrument(gradient=2.5), "gradient"),
        (ins.Instrument(drift=(2e4, 0.0)), "drift"),
        (ins.Instrument(drift=(1.0,)), "drift"),
    ]:
        with pytest.raises(ValueError, match=message):
            instrument.check()
    assert ins.Instrument(jitter=0.5, drift=(-3.0, 2.0)).margin() == 7  # ceil(2 + 3) + 2
