"""Scale matching and the out-of-distribution flag in every output (issue 26, items 2
and 4): the service reply, the live detector, map.json, the batch index and its bands,
the report lines. No training: the rule engine of ``tests/maps/test_scale_matching.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectscope.artifacts.metadata import ModelScale
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.maps.result import MapResult
from defectscope.outputs.map_files import map_summary, write_map_outputs
from defectscope.service.server import Service, encode_reply
from defectscope.tiling.lattice import measure_patch_periods
from tests.maps.test_scale_matching import CLUSTERS, PATCH, cluster_frame, known, make_detector
from tests.synthetic import toy_patches

ZOOM = 1.15  # the frames' lattice spacing over the model's


@pytest.fixture(scope="module")
def model_scale():
    return ModelScale(lattice=measure_patch_periods(toy_patches(10).images))


@pytest.fixture(scope="module")
def detector(model_scale):
    with make_detector(model_scale) as det:
        yield det


@pytest.fixture(scope="module")
def frame():
    return cluster_frame((384, 384), zoom=ZOOM)


def ask(service: Service, frame: np.ndarray, **header) -> dict:
    head = {"op": "rois", "id": 7, "dtype": str(frame.dtype), "shape": list(frame.shape), **header}
    reply = service.handle(json.dumps(head).encode(), frame.tobytes())
    return json.loads(encode_reply(reply))  # what goes over the wire


def test_service_reply_carries_the_scale(detector, frame):
    service = Service(detector)
    reply = ask(service, frame, top=3)
    assert reply["ok"], reply
    scale = reply["scale"]
    assert scale["source"] == "lattice" and scale["applied"]
    assert scale["factor"] == pytest.approx(1 / ZOOM, rel=0.02)
    assert reply["map"]["scale"] == scale and reply["map"]["mode"] == "window"
    assert reply["map"]["window_size"] == pytest.approx(PATCH / scale["factor"])
    assert reply["map"]["frame_shape"] == [384, 384]
    assert reply["out_of_distribution"] is None and reply["unknown_share"] is None  # no density
    assert reply["timing_ms"]["scale"] == pytest.approx(scale["time_ms"], abs=1e-3)
    # Regions and ROIs as Detector.find gives them, in the frame's pixels.
    want = detector.find(frame, MapOptions(top_k=3))
    np.testing.assert_allclose(
        [r["centroid"] for r in reply["regions"]],
        [r["centroid"] for r in want.result.regions()],
        atol=1e-6,
    )
    assert len(known(reply["regions"])) == len(CLUSTERS)
    np.testing.assert_allclose(
        [r["center"] for r in reply["rois"]], [r["center"] for r in want.rois], atol=1e-6
    )


def test_service_header_sets_the_scale(detector, frame):
    service = Service(detector)
    off = ask(service, frame, scale="off")
    assert off["ok"] and off["scale"]["source"] == "none" and not off["scale"]["applied"]
    user = ask(service, frame, options={"scale": "1.1", "ood_share": 0.5})
    assert user["ok"] and user["scale"]["source"] == "user" and user["scale"]["factor"] == 1.1
    assert user["map"]["ood_threshold"] == 0.5 and user["options"]["scale"] == 1.1
    for bad in (10, 0, True, "big"):
        refused = ask(service, frame, scale=bad)
        assert refused["ok"] is False and refused["error"].startswith("scale must be")


def test_live_detector_results_carry_the_scale(detector, frame):
    from defectscope.service.live import LiveDetector

    with LiveDetector(detector) as live:
        live.submit(frame, frame_id="a")
        result = live.get(timeout=60)
    assert result.scale["source"] == "lattice" and result.scale["applied"]
    assert result.out_of_distribution is None and result.unknown_share is None
    assert len(known(result.regions)) == len(CLUSTERS)


def test_map_json_beside_regions_and_windows(detector, frame, tmp_path):
    import csv

    found = detector.find(frame)
    out = write_map_outputs(frame, found.result, tmp_path / "map", rois=found.rois)
    summary = json.loads((out / "map.json").read_text())
    assert summary["scale"] == found.result.info["scale"]
    assert summary["window_size"] == pytest.approx(PATCH / found.result.scale)
    assert summary["frame_shape"] == [384, 384] and summary["classes"] == ["Bulk", "Vacancy"]
    assert summary["out_of_distribution"] is None and summary["ood_threshold"] == 0.25
    regions = json.loads((out / "regions.json").read_text())
    assert regions == json.loads(json.dumps(found.result.regions()))
    rows = list(csv.DictReader((out / "windows.csv").open()))
    assert len(rows) == found.result.labels.size
    # Window positions in the frame's pixels: inside the 384 x 384 frame.
    assert max(int(r["row"]) for r in rows) + PATCH / found.result.scale <= 384 + 1


def hand_map(unknown_share: float, ood_threshold: float = 0.25) -> MapResult:
    """A 10 x 10 window map (no defect) whose first ``unknown_share`` of windows are
    unknown."""
    rows = cols = 10
    grid = np.stack(np.meshgrid(np.arange(rows) * 16, np.arange(cols) * 16, indexing="ij"), -1)
    probs = np.zeros((rows, cols, 2), np.float32)
    probs[..., 0] = 1.0
    unknown = np.zeros(rows * cols, bool)
    unknown[: round(unknown_share * rows * cols)] = True
    return MapResult(
        grid.reshape(-1, 2).astype(np.int64),
        (rows, cols),
        probs,
        np.zeros((rows, cols, 3), np.float32),
        ["Bulk", "A"],
        "Bulk",
        (208, 208),
        64,
        {"total": 1.0},
        uncertainty=np.where(unknown, 0.99, 0.1).reshape(rows, cols).astype(np.float32),
        unknown=unknown.reshape(rows, cols),
        scale=1.0,
        ood_threshold=ood_threshold,
        info={"mode": "window", "scale": {"factor": 1.0, "source": "none", "applied": False}},
    )


def test_out_of_distribution_in_map_json_batch_row_and_notes():
    from defectscope.cli.cmd_map import map_notes
    from defectscope.service.batch_map import describe_map

    ood = hand_map(0.95)
    summary = map_summary(ood)
    assert summary["out_of_distribution"] is True and summary["unknown_share"] == 0.95
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert map_summary(hand_map(0.10))["out_of_distribution"] is False
    assert map_summary(hand_map(0.95, ood_threshold=1.0))["out_of_distribution"] is False
    row: dict = {}
    describe_map(row, ood, [])
    assert row["out_of_distribution"] is True and row["unknown_share"] == 0.95
    assert row["scale_factor"] == 1.0 and row["scale_source"] == "none"
    assert row["scale_applied"] is False and row["scale_warning"] is None
    notes = map_notes(ood)
    assert notes == [
        "out of distribution: 95% of windows unknown (95% away from known defects, threshold "
        "25%); ROIs only with --unknown explore"
    ]


def test_batch_index_holds_the_new_columns(tmp_path):
    import pyarrow.parquet as pq

    from defectscope.service.batch_index import write_index
    from defectscope.service.batch_records import INDEX_COLUMNS, new_row

    rows = [new_row("a.npy", "a.npy", "h", "{}"), new_row("b.npy", "b.npy", "h", "{}")]
    rows[0].update(
        status="ok", scale_factor=0.87, scale_source="lattice", scale_applied=True,
        out_of_distribution=False, unknown_share=0.02,
    )  # fmt: skip
    rows[1].update(status="ok", scale_source="none", scale_warning="no lattice period ...")
    table = pq.read_table(write_index(tmp_path, rows)).to_pylist()
    assert set(table[0]) == set(INDEX_COLUMNS)
    assert table[0]["scale_factor"] == 0.87 and table[0]["scale_applied"] is True
    assert table[0]["out_of_distribution"] is False and table[1]["scale_factor"] is None
    assert table[1]["scale_warning"] == "no lattice period ..."


def test_bands_decide_the_scale_once_and_equal_one_map(detector, model_scale, monkeypatch):
    """A frame mapped in bands at a measured factor is the map of Detector.find."""
    from defectscope.maps import scale as scale_module
    from defectscope.service import batch_bands

    calls = []
    measure = scale_module.measure_frame_periods

    def counted(image):
        calls.append(image.shape)
        return measure(image)

    monkeypatch.setattr(scale_module, "measure_frame_periods", counted)
    fresh = classmethod(lambda cls, *args, **kwargs: make_detector(model_scale))
    monkeypatch.setattr(Detector, "load", fresh)
    monkeypatch.setattr(batch_bands, "cached_detector", lambda *a, **k: detector)
    frame = cluster_frame((400, 256), zoom=ZOOM)
    result = batch_bands.map_large_frame(
        frame, "rule-engine", band=128, options=MapOptions(stride=16), model_hash="rule"
    )
    assert calls == [(400, 256)]  # decided once, on the whole frame
    assert result.timing_ms["bands"] > 1
    want = detector.find(frame).result
    assert result.scale == want.scale != 1.0
    assert result.info["scale"]["factor"] == want.info["scale"]["factor"]
    assert result.frame_shape == (400, 256)
    np.testing.assert_array_equal(result.origins, want.origins)
    np.testing.assert_array_equal(result.labels, want.labels)
    np.testing.assert_allclose(result.probabilities, want.probabilities, atol=1e-5)
    assert [r["bbox"] for r in result.regions()] == [r["bbox"] for r in want.regions()]


def test_report_lines():
    from defectscope.outputs.report import _map_lines

    record = {
        "factor": 1.12, "source": "lattice", "applied": True, "frame_periods_px": [8.93],
        "model_periods_px": [10.0], "warning": None,
    }  # fmt: skip
    lines = _map_lines({"scale": record, "out_of_distribution": True, "unknown_share": 0.95}, None)
    assert lines[0] == "scale x1.12 from the lattice (frame 8.93 px, model 10.00 px)"
    assert lines[1].startswith("out of distribution: 95% of windows unknown")
    warned = {"factor": 1.0, "source": "none", "applied": False, "warning": "no lattice period"}
    assert _map_lines({}, {"scale": warned}) == ["scale warning: no lattice period"]
