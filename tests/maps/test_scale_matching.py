"""Scale matching in Detector.find (issue 26, item 2): the factor, its source, the
resampling and the way back to the original frame's coordinates.

No training: :class:`BlockEngine` is a rule, not a network. It calls a window
``Vacancy`` when a dark 16 x 16 px block (a 2 x 2 cluster of missing columns at the
8 px spacing the "model" was made for) lies in its central 24 x 24 px, so it finds the
clusters of a lattice at the model's scale. The model's lattice periods are measured on
the toy training patches (8 px spacing) the way training records them
(:func:`~defectscope.tiling.lattice.measure_patch_periods`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types

import numpy as np
import pytest
import scipy.ndimage as ndi

from defectscope.artifacts.metadata import ModelConfig, ModelScale
from defectscope.engines.base import Engine
from defectscope.io.frames import Calibration, Frame
from defectscope.maps import scale as scale_module
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.maps.scale import convert, decide_scale, describe, unit_metres
from defectscope.tiling.lattice import SCALE_RANGE, measure_patch_periods
from tests.synthetic import lattice, toy_patches

SPACING = 8.0  # the toy patches' column spacing, px
PATCH = 64
# 2x2 vacancy clusters (lattice indices of their top-left column), far apart.
CLUSTERS = [(4, 4), (4, 24), (15, 13), (26, 5), (27, 26)]


class BlockEngine(Engine):
    """Vacancy when the darkest 16 x 16 block mean of the z-scored window, over block
    centres in the central 24 x 24 px, is below -0.5 (a cluster gives about -0.77, a
    clean lattice at its spacing about 0)."""

    name = "block"

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = inputs[:, 0].astype(np.float64)
        blocks = ndi.uniform_filter(x, size=(1, 16, 16), mode="nearest")
        darkest = blocks[:, 20:44, 20:44].min(axis=(1, 2))
        p = 1.0 / (1.0 + np.exp(np.clip((darkest + 0.5) * 20, -50, 50)))
        probs = np.stack([1 - p, p], 1).astype(np.float32)
        emb = np.stack([darkest, x.std(axis=(1, 2)), x.mean(axis=(1, 2)), p], 1)
        return probs, emb.astype(np.float32)


@pytest.fixture(scope="module")
def model_lattice():
    return measure_patch_periods(toy_patches(10).images)


def make_detector(model_scale: ModelScale | None) -> Detector:
    config = ModelConfig(
        classes=("Bulk", "Vacancy"),
        patch_size=PATCH,
        embedding_dim=4,
        background_class="Bulk",
        scale=model_scale,
    )
    return Detector(BlockEngine(config), batch_size=64)


@pytest.fixture(scope="module")
def detector(model_lattice):
    with make_detector(ModelScale(lattice=model_lattice)) as det:
        yield det


@pytest.fixture(scope="module")
def calibrated_detector(model_lattice):
    """A model that knows its patches' pixel size: 0.02 nm."""
    with make_detector(ModelScale(0.02, "nm", model_lattice)) as det:
        yield det


def cluster_frame(shape=(384, 384), zoom=1.0, seed=3) -> np.ndarray:
    """A uint8 lattice with :data:`CLUSTERS`, its spacing ``zoom`` times the model's."""
    vacancies = [(r + a, c + b) for r, c in CLUSTERS for a in (0, 1) for b in (0, 1)]
    image = lattice(shape, SPACING * zoom, 1.5 * zoom, vacancies, seed=seed)
    return (image * 200).clip(0, 255).astype(np.uint8)


def cluster_centres(zoom=1.0) -> np.ndarray:
    """The clusters' centres in pixels (columns at ``(k + 0.5) * spacing``)."""
    return np.array([((r + 1) * SPACING * zoom, (c + 1) * SPACING * zoom) for r, c in CLUSTERS])


def known(regions: list[dict]) -> list[dict]:
    return [r for r in regions if not r.get("unknown")]


def scale_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "defectscope" and r.levelno >= logging.WARNING
    ]


# --- MapOptions -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "off", 1.1, 0.25, 4])
def test_options_scale_json_round_trip(value):
    options = MapOptions(scale=value, ood_share=0.4)
    text = json.dumps(options.to_json(), allow_nan=False)
    again = MapOptions.from_json(json.loads(text))
    assert again == options and again.scale == value and again.ood_share == 0.4
    assert isinstance(again.scale, str if isinstance(value, str) else float)


def test_options_scale_reads_a_number_given_as_text():
    assert MapOptions(scale="1.1").scale == 1.1
    assert MapOptions.from_json({"scale": " 0.9 "}).scale == 0.9
    assert MapOptions().scale == "auto" and MapOptions().ood_share == 0.25


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 0, -1.0, 10, 0.2, True, "fast", "nan", "1e400", None]
)
def test_options_refuse_a_bad_scale_naming_the_key(value):
    with pytest.raises(ValueError, match=r"^scale "):
        MapOptions(scale=value)
    with pytest.raises(ValueError, match=r"^scale "):
        MapOptions.from_json({"scale": value})


def test_options_refuse_json_1e400_and_huge_integers():
    with pytest.raises(ValueError, match=r"^scale "):
        MapOptions.from_json(json.loads('{"scale": 1e400}'))
    with pytest.raises(ValueError, match=r"^scale .*digits"):
        MapOptions.from_json({"scale": 10**400})


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), True, "half"])
def test_options_refuse_a_bad_ood_share(value):
    with pytest.raises(ValueError, match=r"^ood_share "):
        MapOptions(ood_share=value)


def test_cli_scale_and_ood_share_options():
    from defectscope.cli.app import build_parser
    from defectscope.cli.cmd_map import MAPPING

    parser = build_parser()

    def build(*extra):
        return MAPPING.build(parser.parse_args(["map", "m", "f.npy", "--out", "o", *extra]))

    assert build().scale == "auto"
    assert build("--scale", "off").scale == "off"
    assert build("--scale", "1.1", "--ood-share", "0.5") == MapOptions(scale=1.1, ood_share=0.5)
    with pytest.raises(ValueError, match="scale must be 'auto', 'off' or a factor"):
        build("--scale", "10")
    for command in (["cluster", "src", "--model", "m", "--out", "o"],
                    ["score-simulated", "m", "sim"]):  # fmt: skip
        assert MAPPING.build(parser.parse_args([*command, "--scale", "0.9"])).scale == 0.9


# --- units and the decision -----------------------------------------------------------


def test_unit_conversion():
    assert unit_metres("nm") == 1e-9 and unit_metres("Å") == 1e-10
    assert unit_metres("\u212b") == 1e-10 and unit_metres("A") == 1e-10
    assert unit_metres("µm") == unit_metres("μm") == unit_metres("um") == 1e-6
    assert unit_metres("pm") == 1e-12 and unit_metres("M") is None and unit_metres("eV") is None
    assert convert(0.23, "Å", "nm") == pytest.approx(0.023, rel=1e-12)
    assert convert(23.0, "pm", "nm") == pytest.approx(0.023, rel=1e-12)
    assert convert(1.0, "px", "nm") is None


@pytest.mark.parametrize(
    ("size", "unit"), [(0.023, "nm"), (0.23, "Å"), (0.23, "A"), (23.0, "pm"), (2.3e-5, "µm")]
)
def test_calibration_factor_converts_units(model_lattice, size, unit):
    frame = cluster_frame((128, 128))
    model = ModelScale(0.02, "nm", model_lattice)
    decision = decide_scale(frame, Calibration.square(size, unit), model)
    assert decision.source == "calibration" and decision.applied
    assert decision.factor == pytest.approx(1.15, rel=1e-9)
    assert decision.frame_pixel_size == pytest.approx(0.023, rel=1e-9)
    assert decision.unit == "nm" and decision.frame_unit == unit and decision.warning is None
    assert decision.frame_periods is None  # the calibration decided: nothing measured
    record = decision.to_dict()
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert describe(record).startswith("scale x1.15 from the calibration (frame 0.023 nm")


def test_a_frame_calibrated_in_px_counts_as_uncalibrated(model_lattice, caplog):
    frame = cluster_frame((256, 256), zoom=1.15)
    model = ModelScale(0.02, "nm", model_lattice)
    with caplog.at_level(logging.INFO, logger="defectscope"):
        decision = decide_scale(frame, Calibration.square(1.0, "px"), model)
    assert decision.source == "lattice" and decision.warning is None
    assert decision.frame_pixel_size is None and not scale_warnings(caplog)


def test_units_that_do_not_convert_warn_once_and_the_lattice_decides(model_lattice, caplog):
    frame = cluster_frame((256, 256), zoom=1.15)
    model = ModelScale(0.02, "nm", model_lattice)
    decision = decide_scale(frame, Calibration.square(0.023, "eV"), model)
    assert decision.source == "lattice"
    assert decision.factor == pytest.approx(1 / 1.15, rel=0.02)
    warnings = scale_warnings(caplog)
    assert len(warnings) == 1 and "'eV' does not convert to the model's 'nm'" in warnings[0]
    assert "\n" not in warnings[0] and decision.warning in warnings[0]


def test_a_nan_pixel_size_warns_once_and_the_lattice_decides(model_lattice, caplog):
    # Calibration itself refuses NaN (see the CLI test below); a duck-typed one may not.
    bad = types.SimpleNamespace(scale=(float("nan"), float("nan")), unit="nm")
    frame = cluster_frame((256, 256), zoom=1.15)
    decision = decide_scale(frame, bad, ModelScale(0.02, "nm", model_lattice))
    assert decision.source == "lattice" and decision.applied
    (warning,) = scale_warnings(caplog)
    assert "pixel size (nan, nan) nm is not a finite number > 0" in warning


def test_a_nan_pixel_size_is_refused_where_it_enters(tmp_path, capsys):
    from defectscope.cli.app import main

    with pytest.raises(ValueError, match="pixel size must be two finite numbers > 0"):
        Calibration.square(float("nan"), "nm")
    np.save(tmp_path / "f.npy", cluster_frame((128, 128)))
    argv = ["map", str(tmp_path / "no-model"), str(tmp_path / "f.npy"), "--out"]
    argv += [str(tmp_path / "out"), "--pixel-size", "nan"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --pixel-size nan: pixel size must be") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_off_measures_nothing(detector, monkeypatch):
    def fail(frame):
        raise AssertionError("scale off must not measure the frame")

    monkeypatch.setattr(scale_module, "measure_frame_periods", fail)
    found = detector.find(cluster_frame(zoom=1.15), MapOptions(scale="off"))
    record = found.result.info["scale"]
    assert record["source"] == "none" and record["factor"] == 1.0 and not record["applied"]
    assert record["frame_periods_px"] is None and record["warning"] is None
    assert found.result.scale == 1.0


def test_a_model_without_a_scale_maps_unscaled_with_an_info_line(caplog, monkeypatch):
    monkeypatch.setattr(scale_module, "measure_frame_periods", lambda frame: 1 / 0)
    with make_detector(None) as det, caplog.at_level(logging.INFO, logger="defectscope"):
        found = det.find(cluster_frame(zoom=1.15))
    record = found.result.info["scale"]
    assert record["source"] == "none" and not record["applied"] and record["warning"] is None
    assert "records no scale" in record["note"] and not scale_warnings(caplog)
    assert any("records no scale" in r.getMessage() for r in caplog.records)


def test_user_factor_is_applied_as_given(detector):
    frame = cluster_frame((256, 320))
    found = detector.find(frame, MapOptions(scale=1.25))
    result, record = found.result, found.result.info["scale"]
    assert record["source"] == "user" and record["factor"] == 1.25 and record["applied"]
    assert result.scale == 1.25 and result.window_size == PATCH / 1.25
    assert result.frame_shape == (256, 320)
    # The windows of the 320 x 400 resampled frame, back in the frame's pixels.
    from defectscope.tiling.tiler import window_origins

    want = np.rint(window_origins((320, 400), PATCH, 16) / 1.25).astype(np.int64)
    np.testing.assert_array_equal(result.origins, want)
    assert result.origins.dtype == np.int64


def test_a_user_factor_that_leaves_less_than_a_patch_is_an_error(detector):
    with pytest.raises(ValueError, match="smaller than the 64 px patch"):
        detector.find(cluster_frame((96, 96)), MapOptions(scale=0.5))


def test_lattice_factor_and_calibration_factor_in_find(detector, calibrated_detector):
    frame = cluster_frame(zoom=1.15)
    record = detector.find(frame).result.info["scale"]
    assert record["source"] == "lattice" and record["applied"]
    assert record["factor"] == pytest.approx(1 / 1.15, rel=0.02)
    assert record["frame_periods_px"][0] == pytest.approx(SPACING * 1.15, rel=0.01)
    assert record["time_ms"] > 0 and record["model_periods_px"][0] == pytest.approx(8, rel=0.01)
    calibrated = Frame(frame, Calibration.square(0.23, "Å"))
    result = calibrated_detector.find(calibrated).result
    assert result.info["scale"]["source"] == "calibration"
    assert result.scale == pytest.approx(1.15)  # 0.023 nm over the model's 0.02 nm
    assert result.calibration == calibrated.calibration
    assert result.timing_ms["scale"] == result.info["scale"]["time_ms"]
    # At the model's scale the factor is measured and left: within 2 % of 1.
    record = detector.find(cluster_frame()).result.info["scale"]
    assert record["source"] == "lattice" and not record["applied"]
    assert abs(record["factor"] - 1) < 0.02 and record["warning"] is None


@pytest.mark.parametrize("zoom", [0.85, 1.15])
def test_a_frame_and_its_resampled_copy_give_the_same_regions(detector, zoom):
    frame = cluster_frame()
    copy = ndi.zoom(frame.astype(np.float32), zoom, order=3, grid_mode=True, mode="grid-mirror")
    original = detector.find(frame).result
    resampled = detector.find(copy).result
    assert original.scale == 1.0  # at the model's scale already
    assert resampled.scale == pytest.approx(1 / zoom, rel=0.02)
    assert resampled.frame_shape == copy.shape
    want = known(original.regions())
    got = known(resampled.regions())
    assert sorted(r["label"] for r in got) == sorted(r["label"] for r in want)
    assert len(want) == len(CLUSTERS)
    # Each region of the copy, mapped back to the frame's pixels, lies within a window
    # stride (16 px of the frame) of the original's region at the same cluster.
    back = (np.array([r["centroid"] for r in got]) + 0.5) / zoom - 0.5
    ref = np.array([r["centroid"] for r in want])
    distance = np.hypot(*(back[:, None, :] - ref[None, :, :]).transpose(2, 0, 1))
    assert distance.min(axis=1).max() <= 16, distance.min(axis=1)
    assert sorted(distance.argmin(axis=1)) == list(range(len(want)))
    # And the original's at the clusters (the regions are right, not only alike): within
    # half a stride along each axis of a cluster's centre.
    truth = cluster_centres()
    d_truth = np.hypot(*(ref[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    assert d_truth.min(axis=1).max() <= 8 * np.sqrt(2)


def test_subregion_is_resampled_alone_and_stays_in_frame_coordinates(detector, monkeypatch):
    frame = cluster_frame((384, 384), zoom=1.15)
    seen = []
    original_map = Detector.map

    def spy(self, image, **kwargs):
        seen.append(image.shape)
        return original_map(self, image, **kwargs)

    monkeypatch.setattr(Detector, "map", spy)
    found = detector.find(frame, subregion=(100, 40, 300, 340))
    result = found.result
    f = result.scale
    assert f == pytest.approx(1 / 1.15, rel=0.02)
    assert seen == [(round(200 * f), round(300 * f))]  # only the subregion, resampled
    assert result.frame_shape == (384, 384)
    assert result.origins[:, 0].min() == 100 and result.origins[:, 1].min() == 40
    assert (result.origins[:, 0] + result.window_size <= 300 + 1).all()
    assert (result.origins[:, 1] + result.window_size <= 340 + 1).all()


@pytest.mark.parametrize("kind", ["vacuum", "noise"])
def test_vacuum_and_noise_give_one_warning_line_and_an_unscaled_map(detector, caplog, kind):
    rng = np.random.default_rng(5)
    if kind == "vacuum":
        frame = rng.poisson(2.0, (256, 256)).astype(np.uint16)  # a few counts of dark noise
    else:
        frame = rng.normal(100, 20, (256, 256)).astype(np.float32)
    found = detector.find(frame)
    (warning,) = scale_warnings(caplog)
    assert "no lattice period measurable" in warning and "mapped unscaled" in warning
    assert "\n" not in warning
    record = found.result.info["scale"]
    assert record["warning"] in warning and not record["applied"] and record["source"] == "none"
    assert found.result.scale == 1.0
    unscaled = detector.find(frame, MapOptions(scale="off")).result
    np.testing.assert_array_equal(found.result.origins, unscaled.origins)
    np.testing.assert_array_equal(found.result.labels, unscaled.labels)


def test_a_lattice_factor_outside_the_range_warns_and_maps_unscaled(detector, caplog):
    # Columns 6x the model's spacing: the factor would be about 1/6, below 0.25.
    frame = (lattice((512, 512), SPACING * 6, 1.5 * 6, seed=2) * 200).astype(np.uint8)
    found = detector.find(frame)
    record = found.result.info["scale"]
    (warning,) = scale_warnings(caplog)
    low, high = SCALE_RANGE
    assert f"is outside {low:g}-{high:g}: mapped unscaled" in warning
    assert record["source"] == "lattice" and not record["applied"]
    assert record["factor"] == pytest.approx(1 / 6, rel=0.03)
    assert found.result.scale == 1.0


def test_a_memmap_frame_is_resampled_into_a_temporary_memmap_then_removed(
    detector, tmp_path, monkeypatch
):
    path = tmp_path / "frame.npy"
    np.save(path, cluster_frame((512, 448), zoom=1.15))
    frame = np.load(path, mmap_mode="r")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    seen = []
    original_map = Detector.map

    def spy(self, image, **kwargs):
        files = [p for d, _, names in os.walk(scratch) for p in names]
        seen.append((scale_module.memory_mapped(image), image.dtype, files))
        return original_map(self, image, **kwargs)

    monkeypatch.setattr(Detector, "map", spy)
    result = detector.find(frame).result
    assert seen == [(True, np.float32, ["resampled.float32"])]
    assert list(scratch.iterdir()) == []  # the temporary folder is gone
    # The same map as from the frame in memory (resampled in memory).
    monkeypatch.setattr(Detector, "map", original_map)
    in_memory = detector.find(np.array(frame)).result
    assert in_memory.scale == result.scale != 1.0
    np.testing.assert_array_equal(result.origins, in_memory.origins)
    np.testing.assert_allclose(result.probabilities, in_memory.probabilities, atol=1e-5)
    assert list(scratch.iterdir()) == []


def test_map_itself_stays_unscaled(detector):
    frame = cluster_frame(zoom=1.15)
    result = detector.map(frame, stride=16)
    assert result.scale == 1.0 and "scale" not in result.info


def test_ood_threshold_comes_from_the_options(detector):
    result = detector.find(cluster_frame(), MapOptions(ood_share=0.6)).result
    assert result.ood_threshold == 0.6


def test_scale_record_is_json_and_says_what_happened(detector):
    result = detector.find(cluster_frame(zoom=0.88)).result
    record = result.info["scale"]
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    keys = {"factor", "source", "applied", "frame_periods_px", "model_periods_px"}
    keys |= {"frame_pixel_size", "model_pixel_size", "unit", "warning", "time_ms"}
    assert keys <= set(record)
    line = describe(record)
    assert line.startswith(f"scale x{record['factor']:.3g} from the lattice (frame ")
    assert dataclasses.is_dataclass(decide_scale(cluster_frame((64, 64)), None, None))


# --- refining a lattice factor on patches of the model's size ---------------------------


@pytest.mark.parametrize("zoom", [0.85, 1.15])
def test_refinement_corrects_a_factor_a_per_cent_off(zoom):
    from defectscope.maps.scale import refine_factor

    # the model's periods measured on 64 px patches of the lattice at its own scale
    nominal = cluster_frame((640, 640), seed=5).astype(np.float32)
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 640 - PATCH, (200, 2))
    model = measure_patch_periods(
        np.stack([nominal[y : y + PATCH, x : x + PATCH] for y, x in corners])
    )
    frame = cluster_frame((512, 512), zoom=zoom).astype(np.float32)
    true = 1 / zoom
    refined = [refine_factor(frame, start, model) for start in (true * 1.01, true / 1.01)]
    assert refined == pytest.approx([true, true], rel=0.002)


def test_refinement_leaves_alone_what_it_cannot_measure(model_lattice):
    from defectscope.maps.scale import refine_factor

    noise = np.random.default_rng(0).normal(100, 10, (512, 512)).astype(np.float32)
    assert refine_factor(noise, 1.1, model_lattice) == 1.1
    small = cluster_frame((60, 60)).astype(np.float32)  # less than a patch's region
    assert refine_factor(small, 1.1, model_lattice) == 1.1
    legacy = dataclasses.replace(model_lattice, longest=None)  # a record from before
    assert refine_factor(cluster_frame().astype(np.float32), 1.03, legacy) == 1.03


def test_a_frame_at_the_models_scale_is_not_refined(detector, monkeypatch):
    calls = []
    real = scale_module.refine_factor
    monkeypatch.setattr(scale_module, "refine_factor", lambda *a: calls.append(a[1]) or real(*a))
    at_scale = detector.find(cluster_frame(), MapOptions(stride=16)).result
    assert not at_scale.info["scale"]["applied"] and calls == []
    zoomed = detector.find(cluster_frame(zoom=1.15), MapOptions(stride=16)).result
    assert zoomed.info["scale"]["applied"] and len(calls) == 1
