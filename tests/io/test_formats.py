"""Microscope files with calibration: reading, picking signals, calibrated outputs."""

from __future__ import annotations

import builtins
import csv
import json

import numpy as np
import pytest
import tifffile

from defectscope.cli import main
from defectscope.io.frames import ImageReadError, read_frame
from tests.conftest import REPO

INSTRUMENT = REPO.parent / "shared" / "datasets" / "instrument-files"
EMD = "Test SI 16x16 ReducedData 215 kx.emd"


@pytest.fixture(scope="module")
def instrument():
    if not INSTRUMENT.is_dir():
        pytest.skip(f"instrument files not found at {INSTRUMENT}")
    pytest.importorskip("rsciio", reason="RosettaSciIO (the formats extra) is not installed")
    return INSTRUMENT


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "scale", "unit"),
    [
        ("test_STEM_image.dm3", (68, 68), "uint32", 0.24854, "nm"),
        ("128x128-TEM_search.emi", (128, 128), "int32", 5.2612, "nm"),
        ("128x128-TEM_search_1.ser", (128, 128), "int32", 5.2612, "nm"),
        ("HAADFscan.mrc", (16, 16), "uint16", 5.6791, "nm"),
        ("test_loading_image_saved_with_DM.tif", (68, 68), "int32", 0.16867, "µm"),
        (EMD, (16, 16), "uint16", 3.5992, "nm"),  # the HAADF image by default
    ],
)
def test_instrument_files_with_calibration(instrument, name, shape, dtype, scale, unit):
    frame = read_frame(instrument / name)
    assert frame.data.shape == shape and frame.data.dtype == np.dtype(dtype)
    assert frame.calibration is not None
    assert frame.calibration.scale == pytest.approx((scale, scale), rel=1e-4)
    assert frame.calibration.unit == unit


def test_velox_channels(instrument):
    assert read_frame(instrument / EMD).title == "HAADF"
    cu = read_frame(instrument / EMD, channel="Cu")
    assert cu.title == "Cu" and cu.data.dtype == np.float32
    with pytest.raises(ImageReadError, match=r"no signal named 'Fe'") as info:
        read_frame(instrument / EMD, channel="Fe")
    assert all(f"'{name}'" in str(info.value) for name in ("C", "Ca", "O", "Cu", "HAADF"))


def test_uncalibrated_dm4(instrument):
    frame = read_frame(instrument / "test-1.dm4")
    assert frame.data.shape == (2, 2) and frame.calibration is None


def test_missing_extra_is_named(instrument, monkeypatch):
    real_import = builtins.__import__

    def no_rsciio(name, *args, **kwargs):
        if name.startswith("rsciio"):
            raise ImportError("no rsciio")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rsciio)
    monkeypatch.setattr("importlib.import_module", lambda name: no_rsciio(name))
    with pytest.raises(ImageReadError, match=r"defectscope\[formats\]"):
        read_frame(instrument / "HAADFscan.mrc")


def test_imagej_stack_written_here(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (3, 80, 90), dtype=np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(20, 20), metadata={"unit": "nm", "axes": "ZYX"}
    )
    with pytest.raises(ImageReadError, match="stack of 3 frames"):
        read_frame(path)
    assert np.array_equal(read_frame(path, frame=2).data, stack[2])
    np.testing.assert_allclose(read_frame(path, sum_frames=True).data, stack.sum(0))
    with pytest.raises(ImageReadError, match="out of range"):
        read_frame(path, frame=3)
    pytest.importorskip("rsciio")
    cal = read_frame(path, frame=0).calibration
    assert cal.scale == pytest.approx((0.05, 0.05)) and cal.unit == "nm"


def test_plain_formats_have_no_calibration(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((70, 70), np.float32))
    frame = read_frame(tmp_path / "f.npy")
    assert frame.calibration is None and frame.data.shape == (70, 70)
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_frame(tmp_path / "f.xyz")


@pytest.mark.parametrize(
    "name",
    [
        "test_STEM_image.dm3",
        "128x128-TEM_search.emi",
        "test_loading_image_saved_with_DM.tif",
        "test-1.dm4",
        "HAADFscan.mrc",
        EMD,
    ],
)
def test_map_and_roi_on_every_instrument_file(instrument, name, model_dir, tmp_path, capsys):
    source = instrument / name
    frame = read_frame(source)
    out = tmp_path / "map"
    code = main(
        [
            "map",
            str(model_dir),
            str(source),
            "--stride",
            "4",
            "--out",
            str(out),
            "--backend",
            "torch",
        ]
    )
    if min(frame.data.shape) < 64:
        assert code == 1 and "smaller than" in capsys.readouterr().err
        assert not out.exists()
        return
    assert code == 0
    unit = frame.calibration.unit
    rows = list(csv.DictReader((out / "windows.csv").open()))
    cal = frame.calibration
    for row in rows[:10]:
        assert float(row[f"cy_{unit}"]) == pytest.approx(
            cal.offset[0] + float(row["cy"]) * cal.scale[0], rel=1e-5
        )
    for region in json.loads((out / "regions.json").read_text()):
        assert region["unit"] == unit and len(region["centroid_calibrated"]) == 2
    assert (
        main(
            [
                "roi",
                str(model_dir),
                str(source),
                "--stride",
                "4",
                "--out",
                str(tmp_path / "rois.json"),
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    for roi in json.loads((tmp_path / "rois.json").read_text()):
        y, x = roi["center"]
        assert roi["center_calibrated"] == pytest.approx(cal.to_physical(y, x))
        assert roi["unit"] == unit


def test_cluster_instrument_frame_is_calibrated(instrument, model_dir, tmp_path):
    source = instrument / "128x128-TEM_search.emi"
    cal = read_frame(source).calibration
    out = tmp_path / "cluster"
    args = ["cluster", str(source), "--model", str(model_dir), "--out", str(out)]
    assert main([*args, "--k-max", "3", "--stride", "16", "--backend", "torch"]) == 0
    report = json.loads((out / "cluster.json").read_text())
    assert report["calibration"] == cal.to_dict()
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert len(rows) == report["n_items"] == 25
    for row in rows:
        cy, cx = float(row["cy"]), float(row["cx"])
        assert [float(row["cy_nm"]), float(row["cx_nm"])] == pytest.approx(
            cal.to_physical(cy, cx), rel=1e-5
        )
        assert float(row["cy_norm"]) == pytest.approx((cy + 0.5) / 128, abs=1e-6)
        assert 0 <= int(row["cluster"]) < report["learned"]["k"]
