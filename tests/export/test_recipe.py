"""The one export recipe: FP32 ONNX, both INT8 models, TensorRT engines, export.json merged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from defectscope.engines.onnx import OnnxEngine
from defectscope.engines.tensorrt import tensorrt_available
from defectscope.evaluation.scoring import classify_patches, open_engine
from defectscope.export.onnx import ExportError, read_onnx_metadata
from defectscope.export.recipe import CalibrationSplit, export_model, read_export_record
from defectscope.io.datasets import PatchSet
from tests.synthetic import toy_patches

# INT8 against FP32 on held-out toy patches: no probability moves further than this, so a
# label may flip only where FP32 is this close to a tie. Measured on AVX-512 VNNI: 0.021
# (U8S8) and 0.033 (symmetric); the margin leaves room for other CPUs' INT8 kernels.
INT8_TOLERANCE = 0.1


def fresh_model(model_dir, tmp_path):
    """A copy of the toy model without exports (the session fixture is shared)."""
    folder = tmp_path / "model"
    shutil.copytree(
        model_dir, folder, ignore=shutil.ignore_patterns("*.onnx", "*.engine*", "export.json")
    )
    return folder


@pytest.fixture(scope="module")
def calibration() -> PatchSet:
    return toy_patches(12, seed=31)  # 24 patches: 16 calibrate, 8 are held out


@pytest.fixture(scope="module")
def exported(model_dir, calibration, tmp_path_factory):
    """The model exported in two calls: FP32 first, then both INT8 models."""
    folder = fresh_model(model_dir, tmp_path_factory.mktemp("recipe"))
    (folder / "export.json").write_text(json.dumps({"note": "written by someone else"}))
    first = export_model(folder, "onnx", calibration, calibration_size=16, seed=3)
    after_first = read_export_record(folder)
    second = export_model(folder, ["int8"], calibration, calibration_size=16, seed=3)
    return folder, first, after_first, second


def test_export_json_is_merged_not_overwritten(exported):
    folder, first, after_first, second = exported
    assert set(first) == {"onnx"} and set(second) == {"int8", "int8_tensorrt"}
    assert after_first == {"note": "written by someone else", **first}
    record = read_export_record(folder)
    assert record == {"note": "written by someone else", **first, **second}
    assert record["onnx"]["n_check_patches"] == 24  # the split's first 64: all 24 patches
    assert record["onnx"]["max_abs_diff_probabilities"] <= record["onnx"]["tolerance"]
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_both_int8_models_agree_with_fp32_on_held_out_patches(exported, calibration):
    folder, _, _, second = exported
    split = CalibrationSplit.seeded(24, 16, seed=3)
    assert sorted(np.concatenate([split.calibration, split.held_out])) == list(range(24))
    held_out = toy_patches(8, seed=77)  # patches no step of the export saw
    fp32 = OnnxEngine(folder / "model.onnx")
    want, _ = classify_patches(fp32, held_out.images)
    near_tie = np.abs(want[:, 1] - 0.5) <= INT8_TOLERANCE
    assert near_tie.mean() <= 0.5  # else the label check below would test little
    for key, name, target in (
        ("int8", "model.int8.onnx", "cpu"),
        ("int8_tensorrt", "model.int8.trt.onnx", "tensorrt"),
    ):
        entry = second[key]
        assert entry["path"] == str(folder / name) and entry["n_calibration"] == 16
        assert entry["n_patches"] == len(split.held_out) == 8
        meta = read_onnx_metadata(folder / name)
        assert meta["precision"] == "int8" and meta["target"] == target
        graph = onnx.load(str(folder / name)).graph
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
        zero_points = [
            numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("zero_point")
        ]
        if target == "tensorrt":  # signed and symmetric: every zero point is 0
            assert zero_points and not any(z.any() for z in zero_points)
        else:  # U8S8: unsigned activations
            assert np.dtype(np.uint8) in {z.dtype for z in zero_points}
        got, _ = classify_patches(OnnxEngine(folder / name), held_out.images)
        assert np.abs(got - want).max() <= INT8_TOLERANCE, key
        same = got.argmax(1) == want.argmax(1)
        assert same[~near_tie].all(), key


def test_the_main_jobs_split_and_notes_are_recorded(model_dir, calibration, tmp_path):
    folder = fresh_model(model_dir, tmp_path)
    notes = {"calibration_patches": "train part", "evaluation_patches": "test part"}
    split = CalibrationSplit(np.arange(0, 20, 2), np.arange(1, 24, 2), np.arange(1, 6, 2), notes)
    report = export_model(folder, ("int8", "onnx"), calibration, split=split)
    assert report["onnx"]["n_check_patches"] == 3
    for key in ("int8", "int8_tensorrt"):
        entry = report[key]
        assert entry["n_calibration"] == 10 and entry["n_patches"] == 12
        assert {k: entry[k] for k in notes} == notes
        assert 0 <= entry["accuracy_candidate"] <= 1 and 0 <= entry["agreement"] <= 1
    assert read_export_record(folder) == report


def test_tensorrt_engines_are_built_and_merged(exported, fake_gpu, tmp_path, calibration):
    folder = tmp_path / "model"
    shutil.copytree(exported[0], folder)
    before = read_export_record(folder)
    report = export_model(folder, "tensorrt", precision="int8")
    assert report == {"tensorrt": {"path": str(folder / "model.int8.engine"), "precision": "int8"}}
    assert read_export_record(folder) == {**before, **report}
    sidecar = json.loads((folder / "model.int8.engine.json").read_text())
    assert sidecar["target"] == "tensorrt" and sidecar["precision"] == "int8"
    # The engine scores like the symmetric INT8 model it was built from (the stand-in runs
    # it in float32 with ONNX Runtime: this checks the plumbing, not TensorRT's numerics).
    engine = open_engine(folder / "model.int8.engine")
    assert engine.name == "tensorrt"
    got, _ = classify_patches(engine, calibration.images, batch_size=7)
    want, _ = classify_patches(OnnxEngine(folder / "model.int8.trt.onnx"), calibration.images)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_requests_fail_before_anything_is_written(model_dir, calibration, tmp_path):
    folder = fresh_model(model_dir, tmp_path)
    with pytest.raises(ValueError, match="INT8 export needs real patches"):
        export_model(folder, ("onnx", "int8"))
    with pytest.raises(ValueError, match="formats must be among onnx, int8, tensorrt"):
        export_model(folder, ("onnx", "openvino"))
    with pytest.raises(ValueError, match="needs more than 24 patches"):
        export_model(folder, ("onnx", "int8"), calibration, calibration_size=24)
    with pytest.raises(ValueError, match="calibration size must be an integer >= 1"):
        export_model(folder, ("onnx", "int8"), calibration, calibration_size=0)
    with pytest.raises(ValueError, match=r"model.onnx: missing; run 'defectscope export"):
        export_model(folder, "int8", calibration)
    with pytest.raises(ValueError, match=r"model.int8.trt.onnx: missing.* --int8 --calib DATA"):
        export_model(folder, "tensorrt", precision="int8")
    other = PatchSet(calibration.images, calibration.labels, ["Bulk", "Edge"], calibration.paths)
    with pytest.raises(ValueError, match=r"classes \['Edge'\] are not among the model's"):
        export_model(folder, "onnx", other)
    bad = CalibrationSplit(np.array([0, 1]), np.array([30]), np.array([0]))
    with pytest.raises(ValueError, match=r"held_out holds indices outside 0..23"):
        export_model(folder, "onnx", calibration, split=bad)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.pt"]
    (folder / "export.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"export\.json: not valid JSON"):
        export_model(folder, "onnx")
    assert (folder / "export.json").read_text() == "{not json"
    assert not (folder / "model.onnx").exists()


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT present: the GPU run builds")
def test_tensorrt_without_tensorrt_says_why(exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported[0], folder)
    with pytest.raises(ExportError, match=tensorrt_available()[1]):
        export_model(folder, "tensorrt")
    assert "tensorrt" not in read_export_record(folder)
