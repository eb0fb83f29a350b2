"""Export (ONNX, INT8, TensorRT), engines, streaming maps and their outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest

from defectscope.artifacts.metadata import read_model_dir
from defectscope.cli import main
from defectscope.engines.base import EngineError
from defectscope.engines.loader import load_engine
from defectscope.engines.onnx import OnnxEngine
from defectscope.engines.tensorrt import tensorrt_available
from defectscope.evaluation.scoring import classify_patches, open_engine
from defectscope.export.compare import compare_engines
from defectscope.export.int8 import quantize_onnx_int8
from defectscope.export.onnx import export_onnx, read_onnx_metadata
from defectscope.maps.detector import Detector
from defectscope.maps.result import MapResult, find_regions, scan_fraction
from defectscope.tiling.tiler import patches_to_inputs, window_origins
from tests.synthetic import lattice, toy_patches


@pytest.fixture(scope="module")
def onnx_path(model_dir):
    inputs = patches_to_inputs(
        toy_patches(4, seed=3).images, read_model_dir(model_dir).config.normalization
    )
    report = export_onnx(model_dir, model_dir / "model.onnx", check_inputs=inputs)
    assert report["max_abs_diff_probabilities"] <= report["tolerance"]
    return model_dir / "model.onnx"


@pytest.fixture(scope="module")
def frame():
    vacancies = [(2, 2), (2, 3), (3, 2), (3, 3), (9, 12), (9, 13), (10, 12), (10, 13)]
    return (lattice((128, 160), vacancies=vacancies, seed=11) * 200).clip(0, 255).astype(np.uint8)


def test_onnx_matches_pytorch_on_patches(model_dir, onnx_path):
    patches = toy_patches(5, seed=7).images
    reference = open_engine(model_dir, backend="torch")
    want_p, want_e = classify_patches(reference, patches)
    engine = OnnxEngine(onnx_path)
    got_p, got_e = engine.run(patches_to_inputs(patches, reference.config.normalization))
    np.testing.assert_allclose(got_p, want_p, atol=1e-4)
    np.testing.assert_allclose(got_e, want_e, rtol=1e-3, atol=1e-3)
    meta = read_onnx_metadata(onnx_path)
    assert meta["model"]["classes"] == ["Bulk", "Vacancy"] and meta["temperature"] == 1.5
    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"  # dynamic batch axis


def test_int8_is_qdq_per_channel_and_agrees(model_dir, onnx_path):
    norm = read_model_dir(model_dir).config.normalization
    calib = patches_to_inputs(toy_patches(8, seed=21).images, norm)
    held = toy_patches(8, seed=22)
    int8 = quantize_onnx_int8(onnx_path, model_dir / "model.int8.onnx", calib)
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    init_shapes = {i.name: list(i.dims) for i in graph.initializer}
    weight_scales = [
        init_shapes.get(node.input[1])
        for node in graph.node
        if node.op_type == "DequantizeLinear" and "weight" in node.input[0].lower()
    ]
    assert any(shape and shape[0] > 1 for shape in weight_scales)  # per-channel scales
    report = compare_engines(onnx_path, int8, patches_to_inputs(held.images, norm), held.labels)
    assert report["agreement"] >= 0.8
    assert read_onnx_metadata(int8)["precision"] == "int8"


def test_map_matches_patchwise_reference(model_dir, frame):
    with Detector.load(model_dir, backend="torch", batch_size=7) as det:
        result = det.map(frame, stride=24)
    origins = window_origins(frame.shape, 64, 24)
    assert np.array_equal(result.origins, origins)
    rows, cols = result.grid_shape
    assert rows * cols == len(origins) and result.embeddings.shape == (rows, cols, 256)
    patches = np.stack([frame[y : y + 64, x : x + 64] for y, x in origins])
    want, _ = classify_patches(open_engine(model_dir, backend="torch"), patches)
    np.testing.assert_allclose(result.probabilities.reshape(-1, 2), want, atol=1e-5)
    assert result.timing_ms["total"] > 0


def test_torch_and_onnx_maps_agree(model_dir, onnx_path, frame):
    maps = {}
    for backend in ("torch", "onnxruntime"):
        with Detector.load(model_dir, backend=backend) as det:
            maps[backend] = det.map(frame, stride=8)
    agreement = np.mean(maps["torch"].labels == maps["onnxruntime"].labels)
    assert agreement >= 0.99


def test_memmap_frame_maps_like_array(model_dir, frame, tmp_path):
    path = tmp_path / "frame.npy"
    np.save(path, frame.astype(np.uint16))
    mm = np.load(path, mmap_mode="r")
    with Detector.load(model_dir, backend="torch") as det:
        a, b = det.map(mm, stride=32), det.map(frame.astype(np.uint16), stride=32)
    # One frame, two ways of reading it: the same map up to float32 noise.
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_auto_backend_and_artifact_errors(model_dir, onnx_path, tmp_path):
    assert load_engine(model_dir, "auto").name == "onnxruntime"  # model.onnx sits beside it
    assert load_engine(onnx_path, "auto").name == "onnxruntime"
    with pytest.raises(EngineError, match="not found"):
        load_engine(tmp_path / "nothing.onnx")
    (tmp_path / "weird.bin").write_bytes(b"x")
    with pytest.raises(EngineError, match="unknown artifact type"):
        load_engine(tmp_path / "weird.bin")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        load_engine(tmp_path / "bad.onnx")


def _result(labels_grid, background="Bulk", classes=("Bulk", "A", "B")):
    rows, cols = labels_grid.shape
    probs = np.full((rows, cols, len(classes)), 0.05, np.float32)
    for (r, c), label in np.ndenumerate(labels_grid):
        probs[r, c, label] = 0.9
    origins = window_origins((rows * 10 + 54, cols * 10 + 54), 64, 10)
    return MapResult(
        origins,
        (rows, cols),
        probs,
        None,
        list(classes),
        background,
        (rows * 10 + 54, cols * 10 + 54),
        64,
        {},
    )


def test_scan_fraction_is_pixel_centre_convention():
    # The middle of an even field lies between its two middle pixels.
    assert scan_fraction(127.5, 255.5, (256, 512)) == [0.5, 0.5]
    assert scan_fraction(0, 3, (4, 4)) == [0.125, 0.875]
    assert scan_fraction(-3, 9, (4, 4)) == [0.0, 1.0]


def test_regions_from_known_grid():
    grid = np.zeros((6, 8), int)
    grid[1:3, 1:3] = 1  # a 2x2 region of class A
    grid[4, 6] = 2  # a single window of class B
    regions = find_regions(_result(grid))
    assert [r["n_windows"] for r in regions] == [4, 1]
    big = regions[0]
    assert big["label"] == "A" and big["bbox"] == [10, 10, 84, 84]
    assert big["centroid"] == pytest.approx([46.5, 46.5])
    assert big["score"] == pytest.approx(0.95)
    assert big["centroid_norm"] == pytest.approx([47 / 114, 47 / 134])
    assert regions[1]["label"] == "B" and regions[1]["bbox"] == [40, 60, 104, 124]


def test_map_cli_writes_everything(model_dir, frame, tmp_path):
    frame_path = tmp_path / "frame.npy"
    np.save(frame_path, frame)
    out = tmp_path / "map"
    assert (
        main(
            [
                "map",
                str(model_dir),
                str(frame_path),
                "--stride",
                "16",
                "--out",
                str(out),
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "confidence.png",
        "map.json",
        "overlay.png",
        "regions.json",
        "windows.csv",
    ]
    rows = list(csv.DictReader((out / "windows.csv").open()))
    coordinates = ["row", "col", "cy", "cx", "cy_norm", "cx_norm"]
    assert list(rows[0]) == [*coordinates, "label", "confidence", "p_Bulk", "p_Vacancy"]
    assert len(rows) == len(window_origins(frame.shape, 64, 16))
    for row in rows[:5]:
        assert float(row["cy"]) == pytest.approx(int(row["row"]) + 31.5)
        assert float(row["cx_norm"]) == pytest.approx((int(row["col"]) + 32) / frame.shape[1])
        assert float(row["confidence"]) == pytest.approx(float(row[f"p_{row['label']}"]))
    regions = json.loads((out / "regions.json").read_text())
    for region in regions:
        keys = {"label", "score", "centroid", "bbox", "n_windows", "centroid_norm"}
        assert set(region) == keys | {"frame_fraction"}
        assert region["label"] == "Vacancy"
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["small", "nan", "unreadable", "artifact"])
def test_map_cli_bad_input_leaves_nothing(case, model_dir, tmp_path, capsys):
    frame_path = tmp_path / "frame.npy"
    artifact = model_dir
    if case == "small":
        np.save(frame_path, np.zeros((32, 200), np.uint8))
    elif case == "nan":
        data = np.random.default_rng(0).random((80, 80))
        data[40, 40] = np.nan
        np.save(frame_path, data)
    elif case == "unreadable":
        frame_path = tmp_path / "frame.tif"
        frame_path.write_bytes(b"nope")
    else:
        np.save(frame_path, np.zeros((80, 80), np.uint8))
        artifact = tmp_path / "model.txt"
        artifact.write_text("x")
    out = tmp_path / "out"
    assert main(["map", str(artifact), str(frame_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert {
        "small": "smaller than",
        "nan": "NaN",
        "unreadable": "cannot read",
        "artifact": "unknown artifact",
    }[case] in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_tensorrt_path_skips_or_explains(model_dir, onnx_path, capsys):
    ok, reason = tensorrt_available()
    if ok:
        pytest.skip("TensorRT present: covered by the GPU run")
    assert main(["export", str(model_dir), "--format", "tensorrt", "--precision", "fp16"]) == 1
    assert reason in capsys.readouterr().err


@pytest.mark.skipif(not tensorrt_available()[0], reason=tensorrt_available()[1] or "n/a")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_matches_onnx(model_dir, onnx_path, frame, precision):
    from defectscope.export.int8 import INT8_FILES
    from defectscope.export.tensorrt import build_tensorrt_engine

    source = onnx_path
    if precision == "int8":  # TensorRT takes the symmetric INT8 model, not the CPU's U8S8
        norm = read_model_dir(model_dir).config.normalization
        calib = patches_to_inputs(toy_patches(8, seed=21).images, norm)
        source = model_dir / INT8_FILES["tensorrt"]
        quantize_onnx_int8(onnx_path, source, calib, target="tensorrt")
    engine_path = build_tensorrt_engine(source, model_dir / f"model.{precision}.engine", precision)
    with Detector.load(engine_path) as trt_det, Detector.load(onnx_path) as ort_det:
        a, b = trt_det.map(frame, stride=8), ort_det.map(frame, stride=8)
    assert np.mean(a.labels == b.labels) >= 0.98


def test_recall_at_sources_uses_nearest_window():
    from defectscope.evaluation.provenance import recall_at_sources

    grid = np.zeros((6, 8), int)
    grid[1, 2] = 1  # window at origin (10, 20) is class A
    result = _result(grid)
    positions = np.array([[11, 19], [52, 52], [-1, -1]])  # near (10, 20); near (50, 50)
    labels = np.array([1, 1, 2])
    report = recall_at_sources(result, positions, labels, ["Bulk", "A", "B"])
    assert report["A"] == {"located": 2, "recovered": 0.5}
    assert report["B"] == {"located": 0, "recovered": None}


MEMMAP_SCRIPT = """
import resource, sys
import numpy as np
from defectscope.nets.checkpoint import ModelConfig
from defectscope.maps.detector import Detector
from defectscope.engines.base import Engine

class MeanEngine(Engine):
    # cheap stand-in for the network: the streaming and tiling are what is measured
    def run(self, inputs):
        m = inputs.mean(axis=(1, 2, 3))
        return np.stack([m, -m], 1), np.zeros((len(inputs), self.config.embedding_dim), np.float32)

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

frame = np.memmap(sys.argv[1], dtype=np.uint16, mode="r", shape=(16384, 16384))
peak_before, anon_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon_kib()
det = Detector(MeanEngine(ModelConfig(classes=("a", "b"))), batch_size=256)
result = det.map(frame, stride=128, keep_embeddings=False)
peak_after, anon_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon_kib()
n = result.grid_shape[0] * result.grid_shape[1]
print(n, (peak_after - peak_before) // 1024, (anon_after - anon_before) // 1024)
"""


def test_16k_memmap_streams_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "big.u16"
    with open(path, "wb") as handle:  # sparse 512 MiB file: no disk pages written
        handle.truncate(16384 * 16384 * 2)
    out = subprocess.run(
        [sys.executable, "-c", MEMMAP_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    windows, peak_growth_mib, anon_growth_mib = map(int, out.stdout.split())
    assert windows == 129 * 129  # 128 strided starts plus one flush with the edge, per axis
    # Touched file pages count in RSS (half the rows here: 256 MiB) but are the page
    # cache's; a copy of the frame (512 MiB as uint16, 1 GiB as float32) would be
    # anonymous memory and push the peak past the frame's own size.
    assert peak_growth_mib < 512
    assert anon_growth_mib < 100


def test_d4_symmetry_averages_the_eight_views_and_is_rotation_invariant(model_dir):
    from defectscope.tiling.tiler import tile

    frame = (lattice((128, 128), vacancies=[(7, 8)], seed=12) * 200).clip(0, 255)
    frame = frame.astype(np.uint8)
    with Detector.load(model_dir, backend="torch") as det:
        plain = det.map(frame, stride=32)
        sym = det.map(frame, stride=32, symmetry="d4")
        turned = det.map(np.ascontiguousarray(np.rot90(frame)), stride=32, symmetry="d4")
        # Reference: the engine on the eight views of the tiled patches, averaged here.
        patches = tile(frame, 64, 32, normalization=det.engine.config.normalization)
        views = [np.rot90(patches, k, axes=(2, 3)) for k in range(4)]
        views += [v[..., ::-1] for v in views]
        want = np.mean([det.engine.run(np.ascontiguousarray(v))[0] for v in views], axis=0)
        with pytest.raises(ValueError, match="symmetry"):
            det.map(frame, symmetry="c2")
    np.testing.assert_allclose(sym.probabilities.reshape(-1, 2), want, atol=1e-5)
    assert not np.allclose(sym.probabilities, plain.probabilities, atol=1e-4)
    # The 3x3 grid of a square frame turns with the frame; D4-averaged outputs do not change.
    np.testing.assert_allclose(turned.probabilities, np.rot90(sym.probabilities), atol=1e-4)
