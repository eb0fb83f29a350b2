"""MapOptions (validation, JSON round trip) and Detector.find, the one frame-to-results path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defectscope.io.frames import Calibration, Frame
from defectscope.maps.detector import Detector, Findings
from defectscope.maps.options import MAX_INT, MapOptions, resolve_options
from defectscope.maps.rois import select_rois
from tests.conftest import assert_same_regions, assert_same_rois
from tests.synthetic import lattice


def uint8(image: np.ndarray) -> np.ndarray:
    return (image * 200).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A lattice with two 2x2 vacancy clusters, as the toy model was trained on."""
    vacancies = [(2, 2), (2, 3), (3, 2), (3, 3), (9, 12), (9, 13), (10, 12), (10, 13)]
    return uint8(lattice((128, 160), vacancies=vacancies, seed=11))


@pytest.fixture(scope="module")
def detector(model_dir):
    with Detector.load(model_dir, backend="torch") as det:
        yield det


# --- MapOptions -----------------------------------------------------------------------

FIELDS = {field.name: field for field in dataclasses.fields(MapOptions)}

options_strategy = st.builds(
    MapOptions,
    stride=st.integers(1, MAX_INT),
    mode=st.sampled_from(FIELDS["mode"].metadata["choices"]),
    symmetry=st.sampled_from(FIELDS["symmetry"].metadata["choices"]),
    nan_policy=st.sampled_from(FIELDS["nan_policy"].metadata["choices"]),
    unknown=st.sampled_from(FIELDS["unknown"].metadata["choices"]),
    novelty=st.sampled_from(FIELDS["novelty"].metadata["choices"]),
    top_k=st.integers(1, MAX_INT),
    min_spacing=st.none() | st.floats(0, 1e300) | st.integers(0, 10**6),
    background=st.none() | st.text(min_size=1, max_size=12),
    keep_embeddings=st.booleans(),
    batch_size=st.integers(1, MAX_INT),
)


@settings(max_examples=200, deadline=None)
@given(options=options_strategy)
def test_options_json_round_trip(options):
    text = json.dumps(options.to_json(), allow_nan=False)
    assert set(json.loads(text)) == set(FIELDS)  # every field, so a record is complete
    assert MapOptions.from_json(json.loads(text)) == options
    # A subset of the keys keeps the base's other fields.
    assert MapOptions.from_json({"stride": 7}, base=options) == options.replace(stride=7)


# What each field refuses, of: 1e400 (read by json as inf), -1, "x" and null. Every
# combination not listed is valid (null is "not set" for min_spacing and background,
# "x" a class name for background).
BAD = {
    "stride": ("1e400", "-1", '"x"', "null"),
    "top_k": ("1e400", "-1", '"x"', "null"),
    "batch_size": ("1e400", "-1", '"x"', "null"),
    "mode": ("1e400", "-1", '"x"', "null"),
    "symmetry": ("1e400", "-1", '"x"', "null"),
    "nan_policy": ("1e400", "-1", '"x"', "null"),
    "unknown": ("1e400", "-1", '"x"', "null"),
    "min_spacing": ("1e400", "-1", '"x"'),
    "background": ("1e400", "-1"),
    "keep_embeddings": ("1e400", "-1", '"x"', "null"),
    "scale": ("1e400", "-1", '"x"', "null"),
    "ood_share": ("1e400", "-1", '"x"', "null"),
    "novelty": ("1e400", "-1", '"x"', "null"),
}
CASES = [(key, value) for key, values in BAD.items() for value in values]


@pytest.mark.parametrize(("key", "value"), CASES)
def test_each_bad_value_is_a_value_error_naming_its_key(key, value):
    data = json.loads(f'{{"{key}": {value}}}')
    with pytest.raises(ValueError) as error:
        MapOptions.from_json(data)
    assert str(error.value).startswith(key), str(error.value)
    # The constructor refuses the same values (it is what from_json ends in).
    if value != "null" or key not in ("min_spacing", "background"):
        with pytest.raises(ValueError, match=f"^{key}"):
            MapOptions(**data)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (key, value)
        for key in FIELDS
        for value in ("1e400", "-1", '"x"', "null")
        if value not in BAD[key]
    ],
)
def test_values_not_listed_as_bad_are_taken(key, value):
    data = json.loads(f'{{"{key}": {value}}}')
    assert getattr(MapOptions.from_json(data), key) == data[key]


def test_unknown_keys_aliases_and_huge_integers():
    with pytest.raises(ValueError, match=r"unknown map option.*strde"):
        MapOptions.from_json({"strde": 8})
    with pytest.raises(ValueError, match="must be a JSON object"):
        MapOptions.from_json([("stride", 8)])
    # The service's older names: the error names the key as it was given.
    aliases = {"top": "top_k"}
    assert MapOptions.from_json({"top": 3}, aliases=aliases).top_k == 3
    with pytest.raises(ValueError, match=r"^top must be a positive integer"):
        MapOptions.from_json({"top": 0}, aliases=aliases)
    with pytest.raises(ValueError, match="top_k is given twice"):
        MapOptions.from_json({"top": 3, "top_k": 3}, aliases=aliases)
    with pytest.raises(ValueError, match=r"unknown map option.*top"):
        MapOptions.from_json({"top": 3})
    # A JSON integer has no size limit: it is refused in one short line, not echoed.
    for key in ("stride", "top_k", "batch_size"):
        with pytest.raises(ValueError, match=rf"^{key} must be at most {MAX_INT}, got an integer"):
            MapOptions.from_json({key: 10**400})
    with pytest.raises(ValueError, match=r"^min_spacing is beyond the float range"):
        MapOptions.from_json({"min_spacing": 10**400})
    # Integral floats are integers; numpy integers too (normalized to int).
    assert MapOptions.from_json({"stride": 16.0}).stride == 16
    assert type(MapOptions(stride=np.int64(8)).stride) is int
    assert MapOptions(min_spacing=3).min_spacing == 3.0


def test_resolve_options_takes_old_keywords():
    assert resolve_options(None, stride=8, top=3) == MapOptions(stride=8, top_k=3)
    assert resolve_options(None, stride=None, top=None) == MapOptions()
    chosen = MapOptions(stride=8, top_k=3)
    assert resolve_options(chosen, stride=8, top=3) is chosen  # agreeing keywords are fine
    with pytest.raises(ValueError, match=r"stride=16 differs from options.stride=8"):
        resolve_options(chosen, stride=16)
    with pytest.raises(ValueError, match=r"^top must be a positive integer"):
        resolve_options(None, top=0)
    with pytest.raises(TypeError, match="options must be MapOptions"):
        resolve_options({"stride": 8})


# --- Detector.find --------------------------------------------------------------------

OPTIONS = [
    MapOptions(),
    MapOptions(stride=24, top_k=1),
    MapOptions(stride=16, top_k=3, min_spacing=100.0),
    MapOptions(stride=32, symmetry="d4", top_k=2),
    MapOptions(stride=16, keep_embeddings=False),
    MapOptions(stride=16, nan_policy="zero", mode="window"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: json.dumps(o.to_json()))
def test_find_equals_map_then_select_rois(detector, frame, options):
    found = detector.find(frame, options)
    assert isinstance(found, Findings) and found.options is options
    want = detector.map(
        frame,
        stride=options.stride,
        nan_policy=options.nan_policy,
        symmetry=options.symmetry,
        mode=options.mode,
    )
    np.testing.assert_array_equal(found.result.origins, want.origins)
    np.testing.assert_array_equal(found.result.labels, want.labels)
    np.testing.assert_allclose(found.result.probabilities, want.probabilities, atol=1e-5)
    assert_same_regions(found.result.regions(), want.regions())
    assert_same_rois(
        found.rois, select_rois(want, options.top_k, options.min_spacing, unknown=options.unknown)
    )
    assert found.rois, "the frame's vacancy clusters give ROIs"
    assert (found.result.embeddings is None) == (not options.keep_embeddings)


def test_find_background_and_mode(detector, frame):
    # Another background class: the vacancy windows are "background", bulk the defect.
    found = detector.find(frame, MapOptions(background="Vacancy", top_k=3))
    want = dataclasses.replace(detector.map(frame), background="Vacancy")
    assert found.result.background == "Vacancy"
    assert_same_rois(found.rois, select_rois(want, 3))
    # Its regions are the bulk (one covering most of the frame is no ROI, see rois).
    assert {r["label"] for r in found.result.regions()} == {"Bulk"}
    with pytest.raises(ValueError, match="background class 'Nope' is not among"):
        detector.find(frame, MapOptions(background="Nope"))
    # The toy model has no dense graphs: "dense" says so, "auto" maps window by window.
    with pytest.raises(ValueError, match="no dense map: no dense graph loaded"):
        detector.find(frame, MapOptions(mode="dense"))
    assert detector.find(frame).result.info["mode"] == "window"
    with pytest.raises(TypeError, match="options must be MapOptions"):
        detector.find(frame, {"stride": 16})


def test_find_with_density_explores_unknown_regions(density_model_dir):
    """The unknown policy: a lattice of another spacing is unknown, an ROI only in explore."""
    left = lattice((128, 160), seed=31)
    right = lattice((128, 96), spacing=10.0, seed=32)
    frame = uint8(np.concatenate([left, right], axis=1))
    with Detector.load(density_model_dir, backend="torch") as det:
        want = det.map(frame)
        for policy in ("ignore", "explore"):
            found = det.find(frame, MapOptions(unknown=policy, top_k=5))
            assert_same_rois(found.rois, select_rois(want, 5, unknown=policy))
            assert any(r.get("unknown") for r in found.rois) == (policy == "explore")


def test_find_calibration_and_subregion(detector, frame):
    calibration = Calibration((0.05, 0.05), (10.0, -3.0), "nm")
    options = MapOptions(stride=16, top_k=3)
    from_frame = detector.find(Frame(frame, calibration), options)
    given = detector.find(frame, options, calibration=calibration)
    assert_same_rois(from_frame.rois, given.rois)
    for roi in given.rois:
        y, x = roi["center"]
        assert roi["unit"] == "nm"
        assert roi["center_calibrated"] == pytest.approx([10.0 + 0.05 * y, -3.0 + 0.05 * x])

    # A subregion maps only its pixels and reports positions in the whole frame's.
    y0, x0, y1, x1 = 8, 16, 120, 150
    sub = detector.find(frame, options, calibration=calibration, subregion=(y0, x0, y1, x1))
    crop_calibration = Calibration((0.05, 0.05), (10.0 + 0.05 * y0, -3.0 + 0.05 * x0), "nm")
    crop = detector.find(frame[y0:y1, x0:x1], options, calibration=crop_calibration)
    assert sub.result.frame_shape == frame.shape
    np.testing.assert_array_equal(sub.result.origins, crop.result.origins + np.array([y0, x0]))
    assert len(sub.rois) == len(crop.rois) > 0
    for a, b in zip(sub.rois, crop.rois, strict=True):
        assert a["bbox"] == [
            b["bbox"][0] + y0,
            b["bbox"][1] + x0,
            b["bbox"][2] + y0,
            b["bbox"][3] + x0,
        ]
        assert a["center"] == pytest.approx([b["center"][0] + y0, b["center"][1] + x0], abs=1e-6)
        assert a["center_norm"] == pytest.approx(
            [(a["center"][0] + 0.5) / frame.shape[0], (a["center"][1] + 0.5) / frame.shape[1]]
        )
        assert a["center_calibrated"] == pytest.approx(b["center_calibrated"], abs=1e-9)
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    for bad in [(0, 0, 500, 10), (1.5, 0, 64, 64), (0, 0, 64)]:
        with pytest.raises(ValueError, match="subregion"):
            detector.find(frame, options, subregion=bad)


def test_rois_goes_through_find(detector, frame):
    want = detector.find(frame, MapOptions(stride=16, top_k=3, min_spacing=40.0)).rois
    assert_same_rois(detector.rois(frame, 3, 16, 40.0), want)
    assert_same_rois(detector.rois(frame, options=MapOptions(top_k=3, min_spacing=40.0)), want)
    calibrated = detector.rois(frame, k=3, pixel_size=0.05, unit="nm", min_spacing=40.0)
    assert len(calibrated) == len(want)
    for roi, plain in zip(calibrated, want, strict=True):
        assert roi["center_calibrated"] == pytest.approx([0.05 * v for v in plain["center"]])
    with pytest.raises(ValueError, match=r"stride=8 differs from options.stride=16"):
        detector.rois(frame, stride=8, options=MapOptions())
    with pytest.raises(ValueError, match="number of ROIs"):
        detector.rois(frame, k=0)
