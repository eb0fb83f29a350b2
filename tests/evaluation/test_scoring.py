"""One runtime: patches scored through any engine (model directory, ONNX file) like PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from defectscope.engines.base import EngineError
from defectscope.evaluation.scoring import (
    classify_patches,
    evaluate_artifact,
    labels_for_model,
    open_engine,
    predict_files,
)
from defectscope.io.datasets import PatchSet
from defectscope.tiling.tiler import tile_numpy
from tests.conftest import REPO
from tests.synthetic import toy_patches

RUNTIME_PYTHON = REPO / ".venv-runtime" / "bin" / "python"
# ONNX Runtime against PyTorch in float32 on the same inputs (the export's own bound).
PROBABILITY_TOLERANCE = 1e-4
# An engine on a GPU computes in TF32 (PyTorch) or FP16 (ONNX Runtime's TensorRT).
GPU_TOLERANCE = 0.02


def tolerance(engine) -> float:
    device = getattr(engine, "device", None)
    gpu = getattr(engine, "on_gpu", False) or (device is not None and device.type != "cpu")
    return GPU_TOLERANCE if gpu else PROBABILITY_TOLERANCE


def decided(probabilities: np.ndarray, tol: float) -> np.ndarray:
    """Patches whose label the reference gives beyond the tolerance (exactly comparable)."""
    return np.abs(probabilities[:, 1] - probabilities[:, 0]) > 4 * tol


def pytorch_reference(model_dir, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings by hand: numpy normalization, a plain forward pass."""
    import torch

    from defectscope.nets.checkpoint import load_checkpoint

    model, config, record = load_checkpoint(model_dir)
    temperature = record["calibration"]["temperature"]
    origin = np.zeros((1, 2), np.int64)
    norm = config.normalization
    inputs = np.concatenate(
        [tile_numpy(im, config.patch_size, origins=origin, normalization=norm) for im in images]
    ).astype(np.float32)
    with torch.inference_mode():
        logits, embedding = model.eval().forward_with_embedding(torch.from_numpy(inputs))
        probabilities = torch.softmax(logits.double() / temperature, dim=1)
    return probabilities.numpy(), embedding.numpy()


def write_dataset(root, patches: PatchSet):
    root.mkdir(parents=True)
    files = []
    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        path = root / f"{patches.classes[label]}_{i}.tif"
        tifffile.imwrite(path, image)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def held_out() -> PatchSet:
    return toy_patches(6, seed=41)


@pytest.fixture(scope="module")
def dataset(held_out, tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring") / "DataSet_Toy"
    return root, write_dataset(root, held_out)


def test_model_dir_and_onnx_score_like_a_pytorch_forward(model_dir, onnx_artifact, held_out):
    want_p, want_e = pytorch_reference(model_dir, held_out.images)
    assert decided(want_p, PROBABILITY_TOLERANCE).mean() >= 0.9  # else the labels test little
    engines = {
        "torch": open_engine(model_dir, backend="torch"),
        "onnxruntime": open_engine(onnx_artifact),
    }
    for name, engine in engines.items():
        assert engine.name == name and engine.temperature == 1.5
        tol = tolerance(engine)
        # A batch size that does not divide the 12 patches: the batches are put together.
        got_p, got_e = classify_patches(engine, held_out.images, batch_size=5)
        assert got_p.shape == (12, 2) and got_e.shape == (12, 256) and got_p.dtype == np.float32
        np.testing.assert_allclose(got_p, want_p, atol=tol, err_msg=name)
        scale = np.abs(want_e).max()
        np.testing.assert_allclose(got_e, want_e, atol=tol * scale, rtol=10 * tol, err_msg=name)
        sure = decided(want_p, tol)
        assert np.array_equal(got_p.argmax(1)[sure], want_p.argmax(1)[sure]), name
    # One patch alone (2-D) and none at all.
    engine = engines["onnxruntime"]
    one, _ = classify_patches(engine, held_out.images[3])
    np.testing.assert_allclose(one[0], want_p[3], atol=tolerance(engine))
    empty_p, empty_e = classify_patches(engine, held_out.images[:0])
    assert empty_p.shape == (0, 2) and empty_e.shape == (0, 256)


def test_evaluate_and_predict_agree_with_the_reference(model_dir, onnx_artifact, held_out, dataset):
    root, files = dataset
    want_p, _ = pytorch_reference(model_dir, held_out.images)
    truth = np.asarray(held_out.labels)
    predicted = want_p.argmax(1)
    want_confusion = np.zeros((2, 2), int)
    np.add.at(want_confusion, (truth, predicted), 1)
    for artifact, backend in ((model_dir, "torch"), (onnx_artifact, "auto")):
        engine = open_engine(artifact, backend)
        tol = tolerance(engine)
        # Patches the reference holds within the tolerance may go either way.
        undecided = int(np.sum(~decided(want_p, tol)))
        metrics = evaluate_artifact(artifact, root, backend=backend)
        assert metrics["classes"] == ["Bulk", "Vacancy"]
        assert metrics["engine"]["backend"] == engine.name
        assert engine.name == ("torch" if backend == "torch" else "onnxruntime")
        # load_patches orders the files its own way: compare counts, not positions.
        confusion = np.array(metrics["confusion"])
        assert np.abs(confusion - want_confusion).sum() <= 2 * undecided
        assert confusion.sum() == len(truth)
        assert metrics["accuracy"] == pytest.approx(
            np.mean(predicted == truth), abs=undecided / len(truth) + 1e-12
        )

        records = predict_files(artifact, files, backend=backend, batch_size=4)
        assert [r["file"] for r in records] == [str(f) for f in files]
        for record, p in zip(records, want_p, strict=True):
            assert set(record["probabilities"]) == {"Bulk", "Vacancy"}
            got = [record["probabilities"]["Bulk"], record["probabilities"]["Vacancy"]]
            np.testing.assert_allclose(got, p, atol=tol)
            assert record["confidence"] == max(got)
            assert record["label"] == ["Bulk", "Vacancy"][int(np.argmax(got))]
    # An open engine and a PatchSet do as well as paths.
    assert evaluate_artifact(engine, held_out)["confusion"] == metrics["confusion"]


NO_TORCH = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx"):
            raise ImportError(f"the runtime imported {name}")
        return None

sys.meta_path.insert(0, NoTorch())
from defectscope.evaluation.scoring import evaluate_artifact, open_engine, predict_files
artifact, data, model_dir = sys.argv[1:4]
metrics = evaluate_artifact(artifact, data)
records = predict_files(artifact, sys.argv[4:])
engine = open_engine(model_dir)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
print(json.dumps({"metrics": metrics, "records": records, "heavy": heavy,
                  "dir_engine": [engine.name, engine.precision]}))
"""


@pytest.mark.parametrize("python", ["blocked", "runtime"])
def test_onnx_evaluation_runs_without_torch(python, model_dir, onnx_artifact, dataset, tmp_path):
    if python == "runtime" and not RUNTIME_PYTHON.is_file():
        pytest.skip(f"{RUNTIME_PYTHON} not found (scripts/setup.sh makes it)")
    root, files = dataset
    # A model directory without torch: auto takes its FP32 model.onnx, never the INT8 one
    # (a broken file here: loading it would fail).
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.onnx", "*.engine*"))
    shutil.copy(onnx_artifact, folder / "model.onnx")
    (folder / "model.int8.onnx").write_bytes(b"not an onnx model")
    interpreter = sys.executable if python == "blocked" else str(RUNTIME_PYTHON)
    result = subprocess.run(
        [interpreter, "-c", NO_TORCH, str(onnx_artifact), str(root), str(folder), *map(str, files)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["dir_engine"] == ["onnxruntime", "fp32"]
    want = evaluate_artifact(onnx_artifact, root)
    assert got["metrics"]["confusion"] == want["confusion"]
    assert got["metrics"]["accuracy"] == want["accuracy"]
    want_records = predict_files(onnx_artifact, files)
    for a, b in zip(got["records"], want_records, strict=True):
        assert a["file"] == b["file"] and a["label"] == b["label"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)


def test_auto_on_a_model_dir_with_torch_scores_its_weights(model_dir, onnx_artifact, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.onnx", "*.engine*"))
    (folder / "model.int8.onnx").write_bytes(b"not an onnx model")
    engine = open_engine(folder)
    assert engine.name == "torch"


def test_bad_input_is_named(model_dir, onnx_artifact, held_out, dataset, tmp_path):
    engine = open_engine(onnx_artifact)
    with pytest.raises(ValueError, match=r"shape \(n, 64, 64\), got \(3, 32, 32\)"):
        classify_patches(engine, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="batch size must be an integer >= 1, got 0"):
        classify_patches(engine, held_out.images, batch_size=0)
    with pytest.raises(EngineError, match="model directory not found"):
        open_engine(tmp_path / "nothing")
    with pytest.raises(EngineError, match="backend must be one of"):
        open_engine(onnx_artifact, backend="cuda")
    with pytest.raises(EngineError, match="runs on the onnxruntime backend"):
        open_engine(onnx_artifact, backend="torch")
    other = PatchSet(held_out.images, held_out.labels, ["Bulk", "Interstitial"], held_out.paths)
    with pytest.raises(ValueError, match=r"^toy: classes \['Interstitial'\] are not among"):
        evaluate_artifact(engine, other, source="toy")
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"small.npy: patch shape \(32, 32\) differs"):
        predict_files(engine, [dataset[1][0], small])
    with pytest.raises(ValueError, match="no such file"):
        predict_files(engine, [tmp_path / "missing.tif"])


def test_labels_follow_the_models_class_order(held_out):
    reordered = PatchSet(held_out.images, held_out.labels, ["Bulk", "Vacancy"], held_out.paths)
    labels = labels_for_model(reordered, ["Vacancy", "Other", "Bulk"], "data")
    assert np.array_equal(labels, np.where(held_out.labels == 0, 2, 0))
