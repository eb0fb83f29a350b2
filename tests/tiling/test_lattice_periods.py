"""Lattice periods from power spectra: frames and patch stacks of known spacing, frames
without a lattice, the matching of shells between a model and a frame, the record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from defectscope.simulate.lattice import acquired_lattice, column_profile, lattice_image
from defectscope.tiling.lattice import (
    LatticePeriods,
    match_scale,
    measure_frame_periods,
    measure_patch_periods,
)
from defectscope.tiling.resample import resample_frame


def recorded(side: int, spacing: float, angle: float = 0.0, dose: float = 3.0, seed: int = 0):
    """A low-dose (Poisson) uint8-like frame of a square lattice of known spacing with
    vacancy clusters, rotated by ``angle`` degrees (rotated on a larger frame, then the
    centre cut out, so no edge of the rotation shows)."""
    big = int(side * 1.5) + 8 if angle else side
    clusters = [(3, 3), (9, 12), (20, 5)]
    frame, _ = acquired_lattice((big, big), clusters, spacing=spacing, dose=dose, seed=seed)
    frame = frame.astype(np.float32)
    if angle:
        frame = ndi.rotate(frame, angle, reshape=False, order=1)
    start = (big - side) // 2
    return frame[start : start + side, start : start + side]


def same(a: LatticePeriods, b: LatticePeriods) -> bool:
    """Equal up to the rounding of a different summation order (a transposed layout)."""
    return (
        a.measurable == b.measurable
        and np.allclose(a.periods, b.periods, rtol=1e-9)
        and np.allclose(a.strengths, b.strengths, rtol=1e-6)
    )


def nearest(periods: tuple[float, ...], value: float) -> float:
    return min(periods, key=lambda p: abs(p / value - 1))


def body_centred(shape, spacing: float, weight: float = 0.7, noise: float = 0.05, seed: int = 0):
    """A square lattice with a second one at the cell centres (``weight`` as bright): the
    (1,1) shell outshines the (1,0) shell, as Ti-O columns between Sr do in SrTiO3."""
    rows, cols = (np.arange(n, dtype=np.float64) for n in shape)
    corners = np.outer(column_profile(rows, spacing, 1.5), column_profile(cols, spacing, 1.5))
    half = spacing / 2
    centres = np.outer(
        column_profile(rows + half, spacing, 1.5), column_profile(cols + half, spacing, 1.5)
    )
    image = corners + weight * centres
    return image + np.random.default_rng(seed).normal(0, noise, shape)


def patches_from(frame: np.ndarray, count: int, seed: int = 1, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, frame.shape[0] - size, count)
    xs = rng.integers(0, frame.shape[1] - size, count)
    return np.stack([frame[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


# --- frames of known spacing -----------------------------------------------------------


@pytest.mark.parametrize("spacing", [6.0, 9.5, 14.0])
@pytest.mark.parametrize("angle", [0.0, 23.0, 45.0])
def test_frame_period_of_known_spacing_within_one_percent(spacing, angle):
    # dose 3: a column's peak holds 3 electrons on average (Poisson), jitter 0.3 px
    result = measure_frame_periods(recorded(512, spacing, angle, dose=3.0, seed=int(spacing)))
    assert result.measurable and result.reason is None
    # the (1,0) shell is the strongest; the (1,1) shell is there too (a square lattice)
    assert result.primary == pytest.approx(spacing, rel=0.01)
    assert nearest(result.periods, spacing / np.sqrt(2)) == pytest.approx(
        spacing / np.sqrt(2), rel=0.01
    )
    assert len(result.periods) == len(result.strengths) <= 4
    assert all(s >= 8.0 for s in result.strengths)
    assert list(result.strengths) == sorted(result.strengths, reverse=True)


@pytest.mark.parametrize("shape", [(256, 256), (300, 700), (2048, 2048)])
def test_frame_period_any_frame_size(shape):
    frame = lattice_image(shape, spacing=7.3, noise=0.3, seed=2)
    assert measure_frame_periods(frame).primary == pytest.approx(7.3, rel=0.01)


@pytest.mark.parametrize(
    ("structure", "pixel_size"), [("srtio3", 0.03), ("cdte", 0.025)], ids=["SrTiO3", "CdTe"]
)
def test_frame_periods_of_simulated_crystals(structure, pixel_size):
    # the physical simulation (projected crystal, probe, scan distortions, shot noise)
    from defectscope.simulate.dataset import SimulationSettings, simulate_frame

    # One exponent, identical columns: the shells below are those of these settings
    # (simulate's randomized defaults make Cd and Te columns differ more or less).
    settings = SimulationSettings(
        structure=structure, pixel_size=pixel_size, size=384, defects_per_frame=0,
        exponent_range=None, column_scatter=0.0, vary=0.0,
    )  # fmt: skip
    frame, record = simulate_frame(settings, 0)
    a = record["lattice_spacing"] / pixel_size  # the cubic cell, pixels
    result = measure_frame_periods(frame)
    # SrTiO3 [001] is simple cubic in projection: (100), (110), (200); its (110) shell is
    # the strongest. CdTe [001] (zinc blende, fcc): (200) and (220) only.
    expected = [a / np.sqrt(2), a, a / 2] if structure == "srtio3" else [a / 2, a / np.sqrt(8)]
    assert result.primary == pytest.approx(expected[0], rel=0.01)
    for period in expected:
        assert nearest(result.periods, period) == pytest.approx(period, rel=0.01)


# --- patch stacks --------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [6.0, 9.0, 14.0])
@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_patch_periods_within_one_and_a_half_percent(spacing, angle):
    frame = recorded(900, spacing, angle, dose=3.0, seed=5)
    result = measure_patch_periods(patches_from(frame, 150))
    assert result.measurable
    assert nearest(result.periods, spacing) == pytest.approx(spacing, rel=0.015)
    assert result.primary in (nearest(result.periods, spacing), result.periods[0])


def test_patch_periods_with_a_minority_of_defect_patches():
    spacing = 8.0
    clusters = [(i, j) for i in range(3, 60, 8) for j in range(3, 60, 8)]
    frame, centres = acquired_lattice((520, 520), clusters, spacing=spacing, dose=5, seed=3)
    defects = [
        frame[int(y) - 32 : int(y) + 32, int(x) - 32 : int(x) + 32]
        for y, x in centres
        if 32 <= y <= 488 and 32 <= x <= 488
    ]
    bulk = patches_from(frame, 2 * len(defects), seed=4)
    # a third of the patches centred on a vacancy cluster, the rest anywhere
    patches = np.concatenate([np.stack(defects), bulk])
    assert len(defects) >= 20
    result = measure_patch_periods(patches)
    assert result.primary == pytest.approx(spacing, rel=0.015)


def test_patch_periods_dtype_and_layout_do_not_matter(tmp_path):
    patches = patches_from(recorded(400, 9.0, dose=10.0), 40).astype(np.uint8)
    reference = measure_patch_periods(patches)
    stored = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.dtype(">u2"), patches.shape)
    stored[:] = patches
    stored.flush()
    for variant in (
        patches.astype(">f8"),
        np.load(tmp_path / "p.npy", mmap_mode="r"),
        np.asfortranarray(patches),
    ):
        assert same(measure_patch_periods(variant), reference)


# --- no lattice ----------------------------------------------------------------------


def _vacuum_and_noise():
    rng = np.random.default_rng(7)
    yield "constant", np.full((512, 512), 1234, np.uint16)
    yield "constant+tiny noise", 1000.0 + 1e-6 * rng.normal(size=(512, 512))
    yield "poisson vacuum", rng.poisson(2.0, (512, 512)).astype(np.uint16)
    yield "white noise", rng.normal(size=(384, 640)).astype(np.float32)
    yield "white noise 64", rng.normal(size=(64, 64))
    for sigma in (1.0, 3.0, 6.0):
        yield f"amorphous sigma {sigma}", ndi.gaussian_filter(rng.normal(size=(512, 512)), sigma)
    # scan-line noise: each line's gain drawn anew (draws a line through the spectrum)
    yield "vacuum with flicker", rng.poisson(5.0, (512, 512)) * rng.normal(1, 0.3, (512, 1))
    yield "gradient", np.add.outer(np.arange(512.0), 0.5 * np.arange(512.0))


@pytest.mark.parametrize(("name", "frame"), list(_vacuum_and_noise()), ids=lambda v: str(v)[:24])
def test_no_lattice_is_not_measurable(name, frame):
    result = measure_frame_periods(frame)
    assert not result.measurable, name
    assert result.periods == () and result.strengths == () and result.primary is None
    if name in ("constant", "gradient"):
        assert "constant" in result.reason
    else:
        assert "no lattice peak stands above the noise" in result.reason
        assert "needed" in result.reason


@pytest.mark.parametrize("seed", range(6))
def test_noise_patches_are_not_measurable(seed):
    rng = np.random.default_rng(seed)
    for patches in (rng.normal(size=(1, 64, 64)), rng.poisson(3.0, (200, 64, 64))):
        result = measure_patch_periods(patches)
        assert not result.measurable and "noise" in result.reason


def test_small_frame_is_not_measurable_but_named():
    result = measure_frame_periods(lattice_image((20, 300), spacing=6))
    assert not result.measurable and "too small" in result.reason and "20 x 300" in result.reason


def test_non_finite_pixels_are_filled_or_reported():
    frame = lattice_image((512, 512), spacing=9.0, noise=0.2, seed=1)
    holed = frame.copy()
    holed[100:110, 200:230] = np.nan
    holed[300, 5] = np.inf
    assert measure_frame_periods(holed).primary == pytest.approx(9.0, rel=0.01)
    result = measure_frame_periods(np.full((256, 256), np.nan))
    assert not result.measurable and "non-finite" in result.reason


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 64, 64)),
        np.zeros(100),
        np.zeros((64, 64), complex),
        np.array([["a"] * 64] * 64),
    ],
    ids=["3-D", "1-D", "complex", "text"],
)
def test_frame_bad_input_raises(bad):
    with pytest.raises(ValueError, match="frame must"):
        measure_frame_periods(bad)


def test_patches_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(n, P, P\)"):
        measure_patch_periods(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="square"):
        measure_patch_periods(np.zeros((3, 64, 32)))
    with pytest.raises(ValueError, match="empty"):
        measure_patch_periods(np.zeros((0, 64, 64)))


def test_frame_dtypes_byte_orders_and_memmaps_agree(tmp_path):
    frame = (recorded(512, 11.0, dose=10) * 50).astype(np.uint16)
    reference = measure_frame_periods(frame)
    assert reference.primary == pytest.approx(11.0, rel=0.01)
    path = tmp_path / "frame.npy"
    stored = np.lib.format.open_memmap(path, "w+", np.dtype(">u2"), frame.shape)
    stored[:] = frame
    stored.flush()
    for variant in (
        frame.astype(">u2"),
        frame.astype(">f4"),
        frame.astype(np.int32),
        np.asfortranarray(frame),
        np.load(path, mmap_mode="r"),
    ):
        assert same(measure_frame_periods(variant), reference)


class _Recording(np.ndarray):
    """An array that records the pixels each read takes."""

    reads: list[int]

    def __getitem__(self, key):
        part = np.asarray(super().__getitem__(key))
        type(self).reads.append(part.size)
        return part


def test_frame_is_read_tile_by_tile():
    frame = lattice_image((2048, 2048), spacing=8.0, noise=0.1)
    _Recording.reads = []
    view = frame.view(_Recording)
    assert measure_frame_periods(view).primary == pytest.approx(8.0, rel=0.01)
    # at most 16 tiles of 256 x 256: a quarter of the frame, no read larger than a tile
    assert 0 < len(_Recording.reads) <= 16
    assert max(_Recording.reads) <= 256 * 256
    assert sum(_Recording.reads) <= frame.size // 4


# --- matching a frame to a model ------------------------------------------------------


@pytest.fixture(scope="module")
def model_periods() -> LatticePeriods:
    """The periods of 64 px training patches of a lattice of spacing 8 px."""
    return measure_patch_periods(patches_from(recorded(700, 8.0, dose=5, seed=11), 200))


@pytest.mark.parametrize("true_factor", [0.85, 0.9, 1.1, 1.15])
def test_match_scale_on_frames_recorded_at_another_magnification(model_periods, true_factor):
    assert model_periods.primary == pytest.approx(8.0, rel=0.005)
    # the same lattice seen at another magnification: spacing 8 / f
    frame = recorded(512, 8.0 / true_factor, angle=12.0, dose=1.0, seed=3)
    factor = match_scale(model_periods, measure_frame_periods(frame))
    assert factor == pytest.approx(true_factor, rel=0.01)


@pytest.mark.parametrize("zoom", [0.85, 0.9, 1.1, 1.15])
def test_match_scale_undoes_a_resampling(model_periods, zoom):
    nominal = recorded(600, 8.0, dose=5, seed=4)
    zoomed = resample_frame(nominal, zoom)
    factor = match_scale(model_periods, measure_frame_periods(zoomed))
    assert factor == pytest.approx(1 / zoom, rel=0.01)


@pytest.mark.parametrize("true_factor", [0.85, 0.9, 1.1, 1.15])
def test_match_scale_when_the_strongest_shells_swap(model_periods, true_factor):
    frame = measure_frame_periods(body_centred((512, 512), 8.0 / true_factor))
    # the frame's strongest shell is (1,1), the model's (1,0): pairing the primaries
    # would be sqrt(2) off
    assert frame.primary == pytest.approx(8.0 / true_factor / np.sqrt(2), rel=0.01)
    assert model_periods.primary / frame.primary == pytest.approx(
        true_factor * np.sqrt(2), rel=0.01
    )
    assert match_scale(model_periods, frame) == pytest.approx(true_factor, rel=0.01)


def test_measurements_say_the_longest_period_they_resolve(model_periods):
    assert model_periods.longest == pytest.approx(64 / 4.5)
    assert measure_frame_periods(recorded(512, 8.0)).longest == pytest.approx(256 / 4.5)


@pytest.mark.parametrize(("spacing", "contrast"), [(1.0, 1.2), (1.15, 1.2), (0.85, 0.8)])
def test_a_shell_the_patches_could_not_resolve_does_not_mislead_the_match(spacing, contrast):
    # SrTiO3 [001] at 19.5 px (the synthetic domain-shift study's crystal): 64 px
    # training patches resolve shells up to 14.2 px, not the (100) shell at 19.5 px,
    # which a frame at a stronger column contrast shows; that made the factor sqrt(2) off.
    import dataclasses

    from defectscope.studies.domain_shift import Shift, shifted_frames, study_settings

    training = shifted_frames(study_settings(size=512, seed=0), Shift("nominal"), 1)[0].data
    model = measure_patch_periods(patches_from(training, 300))
    assert max(model.periods) < model.longest < 19.0
    shift = Shift("shifted", spacing=(spacing,), contrast=(contrast,))
    frame = shifted_frames(study_settings(size=768, seed=1000), shift, 1)[0].data
    periods = measure_frame_periods(frame)
    assert match_scale(model, periods) == pytest.approx(1 / spacing, rel=0.01)
    if (spacing, contrast) == (1.0, 1.2):  # records without `longest` match as before
        unaware = match_scale(
            dataclasses.replace(model, longest=None), dataclasses.replace(periods, longest=None)
        )
        assert unaware == pytest.approx(1 / np.sqrt(2), rel=0.01)


def test_match_scale_on_records():
    none = LatticePeriods((), (), measurable=False, reason="vacuum")
    one = LatticePeriods((8.0,), (100.0,))
    assert match_scale(none, one) is None and match_scale(one, none) is None
    assert match_scale(one, LatticePeriods((10.0,), (50.0,))) == pytest.approx(0.8)
    # shells of a square lattice, the frame's fundamental weak but there
    model = LatticePeriods((8.0, 8.0 / np.sqrt(2), 4.0), (500.0, 100.0, 20.0))
    frame = LatticePeriods((5.0 / np.sqrt(2), 2.5, 5.0), (900.0, 300.0, 12.0))
    assert match_scale(model, frame) == pytest.approx(1.6)
    # a tie (both frame shells match the model's one) goes to the factor nearest 1
    tie = LatticePeriods((7.9, 8.1), (50.0, 50.0))
    assert match_scale(one, tie) == pytest.approx(8.0 / 8.1)


# --- the record ----------------------------------------------------------------------


def test_lattice_periods_round_trip_through_json():
    record = LatticePeriods((8.0, 5.657), (120.5, 30.25))
    assert record.primary == 8.0
    data = json.loads(json.dumps(record.to_dict()))
    assert data == {
        "periods": [8.0, 5.657],
        "strengths": [120.5, 30.25],
        "measurable": True,
        "reason": None,
        "longest": None,
    }
    assert LatticePeriods.from_dict(data) == record
    measured = LatticePeriods((8.0,), (50.0,), longest=14.2)
    assert LatticePeriods.from_dict(json.loads(json.dumps(measured.to_dict()))) == measured
    old = {k: v for k, v in data.items() if k != "longest"}  # written before `longest`
    assert LatticePeriods.from_dict(old) == record
    empty = LatticePeriods((), (), measurable=False, reason="no lattice peak")
    assert LatticePeriods.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty
    assert LatticePeriods.from_dict({**data, "later": 1}) == record  # unknown keys ignored


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ([8.0], "object"),
        ({"strengths": [1.0]}, "periods is missing"),
        ({"periods": [8.0]}, "strengths is missing"),
        ({"periods": "8", "strengths": [1.0]}, "periods must be a list"),
        ({"periods": [float("nan")], "strengths": [1.0]}, "periods must hold finite"),
        ({"periods": [-8.0], "strengths": [1.0]}, "periods must hold finite"),
        ({"periods": [8.0], "strengths": [0.0]}, "strengths must hold finite"),
        ({"periods": ["8"], "strengths": [1.0]}, "periods must hold numbers"),
        ({"periods": [True], "strengths": [1.0]}, "periods must hold numbers"),
        ({"periods": [8.0, 4.0], "strengths": [1.0]}, "one entry per period"),
        ({"periods": [8.0] * 9, "strengths": [1.0] * 9}, "at most 8"),
        ({"periods": [8.0], "strengths": [1.0], "measurable": "yes"}, "measurable"),
        ({"periods": [], "strengths": []}, "must not be empty"),
        ({"periods": [8.0], "strengths": [1.0], "measurable": False}, "must be empty"),
        ({"periods": [8.0], "strengths": [1.0], "reason": 3}, "reason"),
        ({"periods": [8.0], "strengths": [1.0], "longest": 0}, "longest"),
        ({"periods": [8.0], "strengths": [1.0], "longest": 1e400}, "longest"),
        ({"periods": [8.0], "strengths": [1.0], "longest": "14"}, "longest"),
    ],
)
def test_lattice_periods_from_dict_names_the_bad_key(data, named):
    with pytest.raises(ValueError, match=named):
        LatticePeriods.from_dict(data)
