"""The napari plugin, headless (Qt offscreen): reader, widget, writer, sample data.

Skipped with the reason where napari, pytest-qt or a Qt platform is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
napari = pytest.importorskip("napari", reason="napari is the optional 'napari' extra")
pytest.importorskip("pytestqt", reason="pytest-qt comes with the 'napari' extra")

from defectscope.io.frames import read_frame  # noqa: E402
from defectscope.maps.detector import Detector  # noqa: E402
from defectscope.maps.options import MapOptions  # noqa: E402
from defectscope.maps.result import pixel_grid_index  # noqa: E402
from defectscope.napari.plugin import (  # noqa: E402
    get_reader,
    read_map_folder,
    sample_frame,
    sample_model,
)
from tests.conftest import CENTRE_SCALE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
INSTRUMENT = REPO.parent / "shared" / "datasets" / "instrument-files"
ARTIFACTS = Path(os.environ.get("DEFECTSCOPE_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def sample_model_dir(tmp_path_factory):
    """The plugin's sample model, trained like on first use, checked to find the clusters."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = sample_model(tmp_path_factory.mktemp("napari") / "sample-model")
    finally:
        torch.set_num_threads(threads)
    frame, _, centres = sample_frame()
    with Detector.load(model, backend="torch") as det:
        regions = [r for r in det.map(frame, stride=16).regions() if not r.get("unknown")]
    found = [any(_inside(r, c) for r in regions) for c in centres]
    if not all(found) or len(regions) > len(centres) + 1:
        pytest.skip(f"the sample model did not train right on this CPU: {len(regions)} regions")
    return model


def _inside(region, centre):
    y0, x0, y1, x1 = region["bbox"]
    return y0 <= centre[0] < y1 and x0 <= centre[1] < x1


@pytest.mark.parametrize(
    "name", ["test_STEM_image.dm3", "test-1.dm4", "HAADFscan.mrc", "128x128-TEM_search_1.ser"]
)
def test_reader_gives_scale_and_units_of_instrument_files(name):
    path = INSTRUMENT / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared instrument files)")
    pytest.importorskip("rsciio", reason="microscope formats are the 'formats' extra")
    reader = get_reader(str(path))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(path))
    frame = read_frame(path)
    assert kind == "image"
    np.testing.assert_array_equal(data, frame.data)
    if frame.calibration is not None:
        assert kwargs["scale"] == pytest.approx(frame.calibration.scale)
        assert kwargs["metadata"]["calibration"]["unit"] == frame.calibration.unit
        layer = napari.layers.Layer.create(data, kwargs, kind)
        assert tuple(layer.scale) == pytest.approx(frame.calibration.scale)
        if "units" in kwargs:
            assert str(layer.units[0]) != "pixel"


def test_reader_declines_what_it_cannot_open(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without windows.csv
    assert get_reader([str(tmp_path), str(tmp_path)]) is None


def test_widget_layers_equal_a_map_and_rois_round_trip(qtbot, sample_model_dir, tmp_path):
    from napari.components import ViewerModel

    from defectscope.maps.rois import select_rois
    from defectscope.napari.widget import find_defects_widget

    # The viewer's model without a canvas: no OpenGL needed (the screenshot test needs it).
    viewer = ViewerModel()
    ((data, kwargs, kind),) = _sample_layer(sample_model_dir)
    image = viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
    widget = find_defects_widget(viewer)
    qtbot.addWidget(widget)
    widget.model.setText(str(sample_model_dir))
    widget.backend.setCurrentText("torch")
    widget.top.setValue(5)
    assert widget.options() == MapOptions(stride=16, top_k=5)
    viewer.layers.selection.active = image
    widget.run()
    assert widget.busy  # the map runs in a worker thread; the viewer stays responsive
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.error is None, widget.error
    assert widget.progress.value() == widget.progress.maximum() > 0

    frame, calibration, _ = sample_frame()
    with Detector.load(sample_model_dir, backend="torch") as det:
        reference = det.map(frame, stride=16, calibration=calibration)
    rows, cols = pixel_grid_index(reference)
    labels = viewer.layers[f"{image.name} classes"]
    np.testing.assert_array_equal(labels.data, reference.labels[np.ix_(rows, cols)] + 1)
    assert tuple(labels.scale) == pytest.approx(calibration.scale)  # physical coordinates
    confidence = viewer.layers[f"{image.name} confidence"]
    np.testing.assert_allclose(confidence.data, reference.confidence[np.ix_(rows, cols)], atol=1e-5)
    boxes = viewer.layers[f"{image.name} regions"]
    assert len(boxes.data) == len(reference.regions())
    points = viewer.layers[f"{image.name} ROIs"]
    want = select_rois(reference, 5)
    # Centres are probability-weighted means of window centres: two runs of one map
    # agree to float32 noise in the probabilities (1e-5) times the frame's side.
    np.testing.assert_allclose(points.data, [r["center"] for r in want], atol=1e-5 * CENTRE_SCALE)
    assert list(points.features["rank"]) == [r["rank"] for r in want]

    # The user deletes the second ROI and adds one by hand, then saves.
    points.selected_data = {1}
    points.remove_selected()
    points.add([[100.0, 120.0]])
    out = tmp_path / "edited"
    out.mkdir()
    # napari's own File > Save Selected Layers goes through the plugin's writer (found
    # through the package's napari.manifest entry point, as napari does at start-up).
    from npe2 import PluginManager

    PluginManager.instance().discover()
    viewer.layers.selection.active = points
    (written,) = viewer.layers.save(str(out / "rois.json"), selected=True, plugin="defectscope")
    rois = json.loads(Path(written).read_text())
    assert [r["rank"] for r in rois] == list(range(1, len(want) + 1))
    assert rois[-1]["label"] == "manual" and rois[-1]["center"] == [100.0, 120.0]
    assert [r["label"] for r in rois[:-1]] == [r["label"] for r in want if r["rank"] != 2]
    assert rois[0]["center_norm"] == pytest.approx(want[0]["center_norm"], abs=1e-5)
    (back,) = [layer for layer in read_map_folder(str(out)) if layer[2] == "points"]
    np.testing.assert_allclose(back[0], [r["center"] for r in rois])


def _sample_layer(model):
    from defectscope.napari.plugin import sample_lattice_layer

    return sample_lattice_layer(model)


def test_widget_cancel_stops_the_map(qtbot, sample_model_dir):
    from napari.components import ViewerModel

    from defectscope.napari.widget import find_defects_widget

    viewer = ViewerModel()
    big = np.tile(sample_frame()[0], (3, 3))
    viewer.add_image(big, name="big")
    widget = find_defects_widget(viewer)
    qtbot.addWidget(widget)
    widget.model.setText(str(sample_model_dir))
    widget.backend.setCurrentText("torch")
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.error is None and widget.status.text().startswith("cancelled")
    assert "big classes" not in [layer.name for layer in viewer.layers]


def test_viewer_screenshot_of_the_widget_result(sample_model_dir, tmp_path):
    """napari with the widget's layers, kept as test-artifacts/napari-find-defects.png.

    A napari canvas needs OpenGL, which Qt's offscreen platform lacks: the viewer runs
    in a subprocess under Xvfb (``xvfb-run``, Debian's xvfb) on Qt's xcb platform.
    """
    import shutil
    import subprocess
    import sys

    if shutil.which("xvfb-run") is None:
        pytest.skip("no xvfb-run: a napari canvas needs OpenGL (Debian package xvfb)")
    from defectscope.export.onnx import export_onnx

    onnx_model = tmp_path / "sample.onnx"
    export_onnx(sample_model_dir, onnx_model)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "napari-find-defects.png"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [
            "xvfb-run",
            "-a",
            "-s",
            "-screen 0 1400x1000x24",
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "tests.napari_screenshot",
            str(onnx_model),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        # As a user runs it: napari behaves differently when it sees PYTEST_CURRENT_TEST.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
            "QT_QPA_PLATFORM": "xcb",
        },
    )
    if "could not load the Qt platform plugin" in done.stderr.lower():
        pytest.skip("Qt's xcb platform cannot start here (libxcb packages missing)")
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    import imageio.v3 as iio

    shot = iio.imread(out)
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.std() > 5


@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_reader_offers_a_stack_with_a_frame_slider_and_its_sum(tmp_path, suffix):
    """Issue 25, finding 13: a 3-D stack was refused; now it is one layer and its sum."""
    from napari.components import ViewerModel

    rng = np.random.default_rng(0)
    stack = (rng.random((3, 40, 50)) * 1000).astype(np.uint16)
    path = tmp_path / f"stack{suffix}"
    if suffix == ".npy":
        np.save(path, stack)
    else:
        import tifffile

        metadata = {"unit": "nm", "axes": "ZYX"}
        tifffile.imwrite(path, stack, imagej=True, resolution=(20, 20), metadata=metadata)
    reader = get_reader(str(path))
    assert reader is not None
    (data, kwargs, kind), (total, sum_kwargs, sum_kind) = reader(str(path))
    assert kind == sum_kind == "image"
    np.testing.assert_array_equal(data, stack)
    # The sum of integers up to 1000 over three frames is exact in float32.
    np.testing.assert_array_equal(total, stack.sum(axis=0, dtype=np.float64))
    assert kwargs["metadata"]["frames"] == 3 and not sum_kwargs["visible"]
    viewer = ViewerModel()
    layer = viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
    viewer.add_layer(napari.layers.Layer.create(total, sum_kwargs, sum_kind))
    assert layer.data.shape == (3, 40, 50)
    assert viewer.dims.nsteps[0] == 3  # the slider steps through the frames
    frame = read_frame(path, frame=1)
    if frame.calibration is not None:  # ImageJ TIFF, read with RosettaSciIO
        assert tuple(layer.scale) == pytest.approx((1.0, *frame.calibration.scale))
        assert kwargs["metadata"]["calibration"]["unit"] == "nm"
    # A file that is no stack and cannot be read says why, as before.
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read"):
        reader(str(bad))


def test_widget_options_come_from_map_options(qtbot):
    from napari.components import ViewerModel

    from defectscope.napari.widget import find_defects_widget

    widget = find_defects_widget(ViewerModel())
    qtbot.addWidget(widget)
    choices = MapOptions.__dataclass_fields__["mode"].metadata["choices"]
    assert [widget.mode.itemText(i) for i in range(widget.mode.count())] == list(choices)
    novelty = [widget.novelty.itemText(i) for i in range(widget.novelty.count())]
    assert novelty == list(MapOptions.__dataclass_fields__["novelty"].metadata["choices"])
    assert widget.options().novelty == "auto"
    chosen = MapOptions(
        stride=24,
        top_k=3,
        mode="window",
        unknown="explore",
        background="Bulk",
        novelty="mc_dropout",
    )
    widget.set_options(chosen)
    assert widget.options() == chosen
    widget.background.setText("  ")
    assert widget.options().background is None


def test_widget_maps_each_frame_of_a_stack_like_find(qtbot, sample_model_dir):
    from napari.components import ViewerModel

    from defectscope.napari.widget import find_defects_widget

    frame = sample_frame()[0]
    stack = np.stack([frame[:128, :128], frame[128:, 128:]])
    viewer = ViewerModel()
    viewer.add_image(stack, name="stack")
    widget = find_defects_widget(viewer)
    qtbot.addWidget(widget)
    widget.model.setText(str(sample_model_dir))
    widget.backend.setCurrentText("torch")
    options = MapOptions(stride=32, top_k=2, mode="window")
    widget.set_options(options)
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.error is None, widget.error
    with Detector.load(sample_model_dir, backend="torch") as det:
        for index in range(2):
            found = det.find(stack[index], options)
            rows, cols = pixel_grid_index(found.result)
            labels = viewer.layers[f"stack [{index}] classes"]
            np.testing.assert_array_equal(labels.data, found.result.labels[np.ix_(rows, cols)] + 1)
            points = viewer.layers[f"stack [{index}] ROIs"]
            assert len(points.data) == len(found.rois)
            np.testing.assert_allclose(
                points.data,
                np.reshape([r["center"] for r in found.rois], (-1, 2)),
                atol=1e-5 * CENTRE_SCALE,
            )


def test_a_map_without_rois_gives_a_points_layer_to_add_rois_to():
    """Before: napari read the empty features as floats and refused the layer."""
    from defectscope.napari.plugin import _roi_layer

    data, kwargs, kind = _roi_layer([], {}, "clean", (64, 64))
    points = napari.layers.Layer.create(data, kwargs, kind)
    assert len(points.data) == 0
    points.add([[10.0, 20.0]])  # the user marks a place by hand
    assert list(points.features["label"]) == ["manual"]
    assert list(points.features["rank"]) == [0]
