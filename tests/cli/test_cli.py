"""The command-line contract: train, evaluate, predict and their errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from defectscope.cli import main
from tests.synthetic import lattice, toy_patches


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "DataSet_Toy"
    root.mkdir()
    patches = toy_patches(10)
    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        name = f"{patches.classes[label]}_{i}.tif"
        rgba = np.dstack([image, image, image, np.full_like(image, 255)])
        tifffile.imwrite(root / name, rgba, compression="lzw")
    return root


@pytest.fixture(scope="module")
def trained(toy_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    code = main(
        [
            "train",
            str(toy_dataset),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--validation",
            "random",
            "--precision",
            "fp32",
            # Two epochs on the toy set: physical augmentation slows learning past them.
            "--no-physical-augmentation",
        ]
    )
    assert code == 0
    return out


def test_train_writes_self_describing_model(trained):
    record = json.loads((trained / "model.json").read_text())
    assert record["model"]["classes"] == ["Bulk", "Vacancy"]
    assert record["model"]["patch_size"] == 64
    assert record["model"]["normalization"]["mode"] == "zscore"
    assert record["training"]["epochs"] == 2 and record["training"]["weights"] == "auto"
    # The tests pin `auto` to random initialization (tests/conftest.py), and say so.
    assert record["training"]["weights_used"] == {"weights": "none"}
    schedule = record["training"]["schedule"]
    assert schedule["trunk_learning_rate"] == record["training"]["learning_rate"]
    assert schedule["epochs"] == 2
    assert len(record["history"]) == 2
    assert record["calibration"]["temperature"] > 0


def test_evaluate_agrees_with_predict(trained, toy_dataset, tmp_path):
    files = sorted(toy_dataset.iterdir())
    assert (
        main(["evaluate", str(trained), str(toy_dataset), "--json", str(tmp_path / "e.json")]) == 0
    )
    assert (
        main(["predict", str(trained), *map(str, files), "--json", str(tmp_path / "p.json")]) == 0
    )
    evaluation = json.loads((tmp_path / "e.json").read_text())
    predictions = json.loads((tmp_path / "p.json").read_text())
    assert set(evaluation) >= {"accuracy", "macro_f1", "per_class", "confusion", "classes"}
    assert len(predictions) == len(files)
    truth = [f.name.rsplit("_", 1)[0] for f in files]
    accuracy = np.mean([p["label"] == t for p, t in zip(predictions, truth, strict=True)])
    assert evaluation["accuracy"] == pytest.approx(accuracy)
    confusion = np.array(evaluation["confusion"])
    assert confusion.sum() == len(files)
    for record in predictions:
        probs = record["probabilities"]
        assert set(probs) == {"Bulk", "Vacancy"}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert record["confidence"] == pytest.approx(max(probs.values()))
        assert record["label"] == max(probs, key=probs.get)


def test_export_then_score_the_onnx_file_like_the_model_dir(trained, toy_dataset, tmp_path, capsys):
    """evaluate and predict ran on PyTorch only; they take an ONNX file now (issue 24)."""
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    calib = ["--calib", str(toy_dataset), "--calib-size", "12"]
    assert main(["export", str(model), "--format", "onnx", "--int8", *calib]) == 0
    lines = capsys.readouterr().out.splitlines()
    made = ["ONNX", "INT8", "INT8 for TensorRT (symmetric)"]
    assert [line.split(":")[0] for line in lines] == made
    record = json.loads((model / "export.json").read_text())
    assert set(record) == {"onnx", "int8", "int8_tensorrt"}
    assert record["int8"]["n_calibration"] == 12 and record["int8"]["n_patches"] == 8
    files = sorted(toy_dataset.iterdir())
    predictions = {}
    for name, artifact in (("torch", model), ("onnx", model / "model.onnx")):
        backend = "torch" if name == "torch" else "auto"
        out = tmp_path / f"{name}.json"
        argv = ["predict", str(artifact), *map(str, files), "--json", str(out)]
        assert main([*argv, "--backend", backend]) == 0
        predictions[name] = json.loads(out.read_text())
    tolerance = record["onnx"]["tolerance"]
    for a, b in zip(predictions["torch"], predictions["onnx"], strict=True):
        assert a["file"] == b["file"]
        for label, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][label]) <= tolerance
    out = tmp_path / "onnx-eval.json"
    assert main(["evaluate", str(model / "model.onnx"), str(toy_dataset), "--json", str(out)]) == 0
    evaluation = json.loads(out.read_text())
    truth = [f.name.rsplit("_", 1)[0] for f in files]
    labels = [p["label"] for p in predictions["onnx"]]
    assert evaluation["accuracy"] == pytest.approx(np.mean(np.equal(labels, truth)))
    assert evaluation["engine"]["backend"] == "onnxruntime"


def test_serve_applies_its_map_options_to_requests_that_do_not_say(trained):
    """serve takes the MapOptions flags (new): they are what a request's options apply over."""
    from defectscope.service.client import Client
    from defectscope.service.server import free_loopback_port

    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    argv = ["serve", str(trained), "--bind", address, "--backend", "torch"]
    command = [sys.executable, "-m", "defectscope.cli", *argv, "--top", "2", "--stride", "32"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        frame = (lattice((160, 160), vacancies=[(9, 9), (9, 10)], seed=3) * 3000).astype(np.uint16)
        with Client(address, timeout_ms=120_000) as client:
            # A bare header: Client.rois would fill in its own stride and top.
            reply = client.request({"op": "rois"}, frame)
            asked = client.rois(frame, top=1, stride=16)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert reply["options"]["top_k"] == 2 and reply["options"]["stride"] == 32
    assert len(reply["rois"]) <= 2
    assert asked["options"]["top_k"] == 1 and asked["options"]["stride"] == 16
    assert "stopped after 2 requests" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["evaluate", "{tmp}/nomodel", "{data}", "--json", "{tmp}/x.json"],
            "model directory not found",
        ),
        (["train", "{tmp}/nodata", "--out", "{tmp}/m"], "dataset folder not found"),
        (["predict", "{model}", "{tmp}/missing.tif", "--json", "{tmp}/x.json"], "no such file"),
        (
            ["train", "{data}", "--out", "{tmp}/m", "--weights", "{tmp}/w.pth"],
            "weights file not found",
        ),
        (
            ["roi", "{model}", "{data}/Bulk_0.tif", "--out", "{tmp}/x.json", "--pixel-size", "-1"],
            "pixel size must be two finite numbers > 0",
        ),
        (["export", "{model}", "--int8"], "needs real patches to calibrate on (--calib DATA)"),
        (
            ["evaluate", "{model}", "{tmp}", "--json", "{tmp}/x.json"],
            "no images found",
        ),
    ],
)
def test_bad_input_one_line_error(args, message, trained, toy_dataset, tmp_path, capsys):
    filled = [a.format(tmp=tmp_path, data=toy_dataset, model=trained) for a in args]
    assert main(filled) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_evaluate_names_the_folder_whose_classes_the_model_lacks(
    trained, toy_dataset, tmp_path, capsys
):
    data = tmp_path / "DataSet_Other"
    data.mkdir()
    for i, source in enumerate(sorted(toy_dataset.iterdir())[:4]):
        shutil.copy(source, data / f"{'Other' if i % 2 else 'Bulk'}_{i}.tif")
    assert main(["evaluate", str(trained), str(data), "--json", str(tmp_path / "e.json")]) == 1
    err = capsys.readouterr().err
    assert f"{data}: classes ['Other'] are not among the model's" in err
    assert not (tmp_path / "e.json").exists()


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "defectscope" in result.stdout


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["roi", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "number of ROIs proposed (default: 5)" in text
    assert "window step in pixels (default: 16)" in text
    assert "(default: None)" not in text


def test_help_shows_zero_and_negative_flag_defaults(capsys):
    # 0 == False: a default of 0 must still be shown, as must --loco/--no-loco's.
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 turns it off) (default: 0)" in text
    assert "one training per class) (default: False)" in text
    assert "skip unreadable/odd files (default" not in text
