"""Issue 26's measurement (defectscope.studies.domain_shift): metrics, frames and a small run.

The metric functions are checked against hand-made regions, truth and maps with counts
worked out by hand; the coordinate convention of the resampled copies against
``scipy.ndimage.zoom`` itself; the study end to end on the tiny toy model (structure
and ranges only: a toy model need not find SrTiO3 defects).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from defectscope.maps.result import MapResult
from defectscope.studies import domain_shift as ds
from tests.synthetic import lattice

REPO = Path(__file__).resolve().parents[2]


def region(label, bbox, unknown=False, centroid=None):
    y0, x0, y1, x1 = bbox
    centre = centroid or [(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2]
    return {"label": label, "bbox": list(bbox), "unknown": unknown, "centroid": centre}


DEFECTS = [
    {"type": "Vacancy_Sr", "row": 50.0, "col": 50.0},  # A: inside R1
    {"type": "Vacancy_Ti", "row": 200.0, "col": 200.0},  # B: 7.07 px from R2 (wrong class)
    {"type": "Vacancy_Sr", "row": 400.0, "col": 100.0},  # C: inside the unknown R4
    {"type": "Vacancy_Ti", "row": 300.0, "col": 300.0},  # D: exactly 10 px above R5
]
REGIONS = [
    region("Vacancy_Sr", (40, 40, 104, 104)),  # R1: right, finds A
    region("Vacancy_Sr", (205, 205, 269, 269)),  # R2: near B but of another class
    region("Vacancy_Sr", (100, 300, 164, 364)),  # R3: nothing near
    region("unknown", (390, 90, 454, 154), unknown=True),  # R4
    region("Vacancy_Ti", (310, 300, 374, 364)),  # R5: D at 10 px
]


def test_bbox_distance_is_zero_inside_and_euclidean_outside():
    # The box covers pixel centres 10..19 (rows) and 20..39 (cols): ends are exclusive.
    points = [(15, 30), (19, 39), (20, 39), (5, 30), (15, 44), (22, 43), (6, 17)]
    got = ds.bbox_distance(np.array(points), [10, 20, 20, 40])
    assert got.tolist() == pytest.approx([0, 0, 1, 5, 5, 5, 5])  # (22,43): 3-4-5; (6,17): 4-3-5


@pytest.mark.parametrize(
    "tolerance, found, any_class, right, per_type",
    [
        # Half of SrTiO3's 19.5 px spacing: D is 10 px from R5, just out of reach.
        (9.75, 1, 2, 1, {"Vacancy_Sr": [1, 2], "Vacancy_Ti": [0, 2]}),
        (10.0, 2, 3, 2, {"Vacancy_Sr": [1, 2], "Vacancy_Ti": [1, 2]}),
    ],
)
def test_score_regions_counts_by_hand(tolerance, found, any_class, right, per_type):
    scores = ds.score_regions(REGIONS, DEFECTS, tolerance)
    assert scores == {
        "defects": 4,
        "found": found,
        "found_any_class": any_class,
        "near_unknown": 1,
        "known_regions": 4,
        "right_regions": right,
        "unknown_regions": 1,
        "per_type": per_type,
    }


def test_score_regions_label_unknown_counts_as_unknown_and_empty_inputs():
    # A region labelled "unknown" without the flag is still not a known region.
    scores = ds.score_regions([region("unknown", (40, 40, 104, 104))], DEFECTS[:1], 5.0)
    assert (scores["found"], scores["known_regions"], scores["unknown_regions"]) == (0, 0, 1)
    assert scores["near_unknown"] == 1
    empty = ds.score_regions([], [], 5.0)
    assert (empty["defects"], empty["found"], empty["right_regions"]) == (0, 0, 0)
    with pytest.raises(ValueError, match="tolerance"):
        ds.score_regions(REGIONS, DEFECTS, float("nan"))


def test_centroid_scores_match_known_regions_one_to_one():
    regions = [
        region("Vacancy_Sr", (0, 0, 64, 64), centroid=[52.0, 50.0]),  # 2 px from A
        region("Vacancy_Ti", (0, 0, 64, 64), centroid=[51.0, 50.0]),  # 1 px from A: wins A
        region("unknown", (0, 0, 64, 64), unknown=True, centroid=[200.0, 200.0]),  # left out
        region("Vacancy_Ti", (0, 0, 64, 64), centroid=[300.0, 306.0]),  # 6 px from D
    ]
    assert ds.centroid_scores(regions, DEFECTS, 5.0) == {"defects": 4, "regions": 3, "matched": 1}
    assert ds.centroid_scores(regions, DEFECTS, 6.0)["matched"] == 2


def grid_result(origins_1d, labels, unknown, frame_side, patch=64):
    """A MapResult on the square grid ``origins_1d`` x ``origins_1d`` with one-hot labels."""
    labels = np.asarray(labels)
    rows = len(origins_1d)
    origins = np.array([(r, c) for r in origins_1d for c in origins_1d], dtype=np.int64)
    probabilities = np.eye(2, dtype=np.float32)[labels]
    return MapResult(
        origins=origins,
        grid_shape=(rows, rows),
        probabilities=probabilities,
        embeddings=None,
        classes=["Bulk", "Vacancy"],
        background="Bulk",
        frame_shape=(frame_side, frame_side),
        patch_size=patch,
        timing_ms={"total": 1.0},
        unknown=np.asarray(unknown, dtype=bool),
    )


def test_label_agreement_takes_the_nearest_window_in_original_pixels():
    # Reference: a 96 px frame, windows at 0 and 32 (centres 31.5, 63.5).
    reference = grid_result([0, 32], [[0, 1], [1, 0]], [[0, 0], [0, 1]], 96)
    # A copy zoomed x2 (192 px): windows at 32, 64, 96 have centres 63.5, 95.5, 127.5,
    # i.e. 31.5, 47.5, 63.5 in the original's pixels ((c + 0.5) / 2 - 0.5). The outer
    # ones fall on the reference's centres; the middle row and column must not be taken.
    labels = [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    unknown = [[0, 1, 0], [1, 1, 1], [0, 1, 1]]
    copy = grid_result([32, 64, 96], labels, unknown, 192)
    # (0,0): Bulk/Bulk; (0,1): Vacancy/Vacancy; (1,0): Vacancy/Bulk; (1,1): unknown/unknown.
    assert ds.label_agreement(reference, copy) == {"compared": 4, "agree": 3, "agreement": 0.75}
    assert ds.window_labels(reference).tolist() == ["Bulk", "Vacancy", "Vacancy", "unknown"]


@pytest.mark.parametrize("zoom", [0.85, 1.15])
def test_to_original_pixels_follows_scipy_zoom(zoom):
    # A Gaussian spot at a known place near two edges: its centroid in the resampled
    # copy, brought back to the original's pixels, is where the spot is.
    yy, xx = np.mgrid[0:120, 0:100]
    spot = (9.3, 88.6)
    image = np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / (2 * 2.5**2))
    copy = ds.resample(image, zoom)
    assert copy.dtype == np.float32
    assert copy.shape == (round(120 * zoom), round(100 * zoom))
    centroid = np.array(ndimage.center_of_mass(np.clip(copy, 0, None)))
    back = ds.to_original_pixels(centroid[None], copy.shape, image.shape)[0]
    # Cubic interpolation of the spot keeps its centroid to about 1e-3 px; the other
    # conventions (centre / zoom, or (H - 1) / (H_r - 1) without the half pixel) put it
    # 0.05-0.09 px off this close to the edges.
    assert back == pytest.approx(spot, abs=0.01)


def test_shift_settings_and_cycles():
    nominal = ds.study_settings(size=128)
    shift = ds.Shift("mixed", spacing=(0.85, 1.15), dose=1 / 3, jitter=2.0, contrast=(0.8,))
    first, second = shift.settings(nominal, 0), shift.settings(nominal, 1)
    assert first.pixel_size == pytest.approx(0.02 / 0.85, rel=1e-12)
    assert second.pixel_size == pytest.approx(0.02 / 1.15, rel=1e-12)
    assert first.exponent == pytest.approx(1.7 * 0.8, rel=1e-12)
    assert first.instrument.dose == pytest.approx(200 / 3, rel=1e-12)
    assert first.instrument.jitter == pytest.approx(0.6, rel=1e-12)
    assert shift.factors(2)["spacing"] == 0.85  # cycles
    assert ds.Shift("nominal").nominal and not shift.nominal
    with pytest.raises(ValueError, match="positive"):
        ds.Shift("bad", spacing=(0.0,))
    names = [s.name for s in ds.default_shifts()]
    assert names[0] == "nominal" and names[-1] == "all combined" and len(names) == 10


def test_goal_summary_takes_the_worst_shifted_value():
    def arm(found, precision, unknown, regions):
        return {
            "found_share": found,
            "precision": precision,
            "unknown_share_per_frame": unknown,
            "unknown_regions_per_defect": regions,
        }

    report = {
        "synthetic": {
            "conditions": [
                {"name": "nominal", "arms": {"auto": arm(1.0, 1.0, [0.0], 0.1)}},
                {"name": "a", "arms": {"auto": arm(0.95, 0.8, [0.02, 0.12], 0.0)}},
                {"name": "b", "arms": {"auto": arm(0.91, None, [0.05], 0.0)}},
            ]
        },
        "real": [
            {
                "arms": {
                    "auto": {
                        "zooms": [
                            {"agreement": 0.93, "unknown_points": -6.0},
                            {"agreement": 0.97, "unknown_points": 2.0},
                        ]
                    }
                }
            }
        ],
    }
    goals = ds.goal_summary(report)["auto"]
    assert goals["worst"] == pytest.approx(
        {
            "unknown_regions_per_defect": 0.1,
            "found": 0.91,
            "precision": 0.8,
            "unknown_share": 0.12,
            "agreement": 0.93,
            "unknown_points": 6.0,
        }
    )
    assert goals["met"] == {
        "unknown_regions_per_defect": True,
        "found": True,
        "precision": False,
        "unknown_share": False,
        "agreement": True,
        "unknown_points": False,
    }


def test_bad_plans_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="nothing to measure"):
        ds.run_domain_shift(tmp_path, synthetic=False, scales=["off"])
    missing = ds.RealFrame("sto", tmp_path / "no-model", tmp_path / "frame.tif")
    with pytest.raises(ValueError, match="is no model"):
        ds.run_domain_shift(tmp_path, synthetic=False, real=[missing], scales=["off"])
    with pytest.raises(ValueError, match="scale"):
        ds.run_domain_shift(tmp_path, synthetic=False, real=[missing], scales=["sideways"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_script_names_a_bad_real_model_spec(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scale_study", REPO / "scripts/scale_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--out", str(tmp_path / "o"), "--real-model", "sto", "frame.tif"])
    assert code == 1
    assert "NAME=MODEL_DIR FRAME" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"bogus": 1}', "unexpected keyword argument 'bogus'"),
        ('{"contrast_range": [2, 1]}', "contrast_range"),
    ],
)
def test_script_names_a_bad_augmentation(tmp_path, capsys, text, message):
    spec = importlib.util.spec_from_file_location("scale_study", REPO / "scripts/scale_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--out", str(tmp_path / "o"), "--synthetic", "--augmentation", text]
    assert script.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "train").exists()  # refused before any simulation
    assert script.augmentation_changes('{"sampling_range": [0.8, 1.25]}') == {
        "sampling_range": (0.8, 1.25)
    }


@pytest.mark.parametrize("flag", ["--bulk-near-defects", "--no-bulk-near-defects"])
def test_script_refuses_a_training_set_option_with_a_kept_model(tmp_path, capsys, flag):
    spec = importlib.util.spec_from_file_location("scale_study", REPO / "scripts/scale_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--out", str(tmp_path / "o"), "--synthetic", "--model", str(tmp_path), flag]
    assert script.main(argv) == 1
    assert "--model reuses one" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- small runs, toy model


@pytest.fixture(scope="module")
def toy_detector(density_model_dir):
    pytest.importorskip("torch")
    from defectscope.maps.detector import Detector

    with Detector.load(density_model_dir, backend="torch") as detector:
        yield detector


def small_synthetic(detector, scales):
    pytest.importorskip("ase", reason="simulation needs the optional 'simulate' extra (ASE)")
    # 192 px: two defects 1.25 patches apart fit inside the scan margins.
    nominal = ds.study_settings(size=192, seed=5, defects_per_frame=2)
    shifts = [ds.Shift("nominal"), ds.Shift("spacing x1.1", spacing=(1.1,))]
    return ds.synthetic_study(detector, nominal, shifts, frames=1, stride=32, scales=scales)


def check_synthetic(report, arms):
    assert [c["name"] for c in report["conditions"]] == ["nominal", "spacing x1.1"]
    for condition in report["conditions"]:
        (frame,) = condition["frames"]
        # 0.3905 nm over the pixel size: the truth's spacing in the frame's pixels.
        spacing = 0.3905 / (0.02 / condition["shift"]["spacing"][0])
        assert frame["spacing_px"] == pytest.approx(spacing, rel=1e-6)
        assert frame["tolerance_px"] == pytest.approx(spacing / 2, rel=1e-6)
        assert set(condition["arms"]) == set(arms)
        for r in condition["arms"].values():
            assert r["defects"] == frame["defects"] > 0
            assert 0 <= r["found"] <= r["found_any_class"] <= r["defects"]
            assert 0 <= r["right_regions"] <= r["known_regions"]
            assert r["centroid_regions"] == r["known_regions"]
            assert 0 <= r["found_share"] <= 1
            assert r["precision"] is None or 0 <= r["precision"] <= 1
            (share,) = r["unknown_share_per_frame"]
            assert 0 <= share <= 1
            # Outside the rings: a part of the unknown windows, never more.
            (unexplained,) = r["unexplained_share_per_frame"]
            assert 0 <= unexplained <= share
            (per_frame,) = r["frames"]
            assert per_frame["windows"] >= 1
            assert sum(n for _, n in r["per_type"].values()) == r["defects"]


def test_synthetic_study_runs_unscaled(toy_detector):
    report = small_synthetic(toy_detector, ("off",))
    check_synthetic(report, ["off"])
    # 192 px at stride 32 with 64 px windows: 5 x 5 windows.
    for condition in report["conditions"]:
        assert condition["arms"]["off"]["frames"][0]["windows"] == 25


def test_synthetic_study_runs_with_scale_matching(toy_detector):
    if not ds.has_scale_option():
        pytest.skip("this build has no scale matching (MapOptions.scale)")
    report = small_synthetic(toy_detector, ("auto", "off"))
    check_synthetic(report, ["auto", "off"])
    table = ds.markdown({"cpu": "test", "synthetic": report})
    header = next(line for line in table.splitlines() if line.startswith("| condition |"))
    assert "unknown outside defect rings" in header
    rows = [line for line in table.splitlines() if line.startswith("| nominal |")]
    assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows)
    for condition in report["conditions"]:
        record = condition["arms"]["auto"]["frames"][0]["scale"]
        assert record is not None and record["source"] in ("calibration", "lattice", "user", "none")
        assert math.isfinite(record["factor"]) and record["factor"] > 0


def test_map_summary_splits_unknown_windows_at_the_rings(toy_detector):
    from defectscope.maps.result import ring_mask

    frame = (lattice((160, 160), vacancies=[(8, 8), (8, 9)], seed=4) * 200).clip(0, 255)
    result = ds.map_frame(toy_detector, frame.astype(np.uint8), 16, "off")
    summary = ds._map_summary(result)
    unknown = result.unknown_mask
    assert summary["unknown_share"] == pytest.approx(unknown.mean())
    assert summary["unexplained_share"] == pytest.approx((unknown & ~ring_mask(result)).mean())


def test_real_study_and_report_files(toy_detector, tmp_path):
    frame = (lattice((128, 128), vacancies=[(6, 6), (6, 7)], seed=3) * 200).clip(0, 255)
    scales = ("auto", "off") if ds.has_scale_option() else ("off",)
    part = ds.real_study(toy_detector, frame.astype(np.uint8), (0.9, 1.1), 32, scales)
    for arm in part["arms"].values():
        assert arm["original"]["windows"] == 9
        assert [row["zoom"] for row in arm["zooms"]] == [0.9, 1.1]
        for row in arm["zooms"]:
            assert row["shape"] == [round(128 * row["zoom"])] * 2
            assert row["compared"] == 9 and 0 <= row["agree"] <= 9
            assert row["agreement"] == pytest.approx(row["agree"] / 9)
            assert -100 <= row["unknown_points"] <= 100
    report = {"cpu": "test", "real": [{"name": "toy", "model": "m", "frame": "f", **part}]}
    ds.write_report(tmp_path, report)
    written = json.loads((tmp_path / ds.JSON_NAME).read_text())
    assert set(written["goals"]) >= {"targets", *part["arms"]}
    table = (tmp_path / ds.MARKDOWN_NAME).read_text()
    assert "## Real frame: toy" in table and "| 0.9 |" in table and "label agreement" in table
