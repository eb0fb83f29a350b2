"""Artifacts bound to the weights they were made from (issue 25, finding 1).

Two untrained models of the same classes stand in for "this model" and "another model":
the checks are about which file answers, not what it answers, so nothing is trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from defectscope.artifacts.metadata import METADATA_KEY, MetadataError
from defectscope.artifacts.provenance import ProvenanceError, model_weights
from defectscope.engines.base import EngineError
from defectscope.engines.loader import artifact_files, artifact_hashes, load_engine
from defectscope.nets.checkpoint import (
    CheckpointError,
    ModelConfig,
    load_checkpoint,
    save_checkpoint,
)
from defectscope.nets.vgg import build_model

CONFIG = ModelConfig(classes=("Bulk", "Vacancy"), patch_size=64, embedding_dim=16)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_model(directory, seed: int):
    torch.manual_seed(seed)
    model = build_model(2, patch_size=64, embedding_dim=16).eval()
    return save_checkpoint(directory, model, CONFIG, {"calibration": {"temperature": 1.5}})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model A with its ONNX and INT8 exports; model B, other weights, same classes."""
    from defectscope.export.int8 import quantize_onnx_int8
    from defectscope.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("provenance")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = random_model(root / "a", 0), random_model(root / "b", 1)
        export_onnx(a, a / "model.onnx")
        patches = np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32)
        quantize_onnx_int8(a / "model.onnx", a / "model.int8.onnx", patches)
    finally:
        torch.set_num_threads(threads)
    return a, b


def model_with(tmp_path, base, *artifacts):
    """A copy of model directory ``base`` holding ``artifacts`` made elsewhere."""
    target = tmp_path / f"{base.name}-with"
    shutil.copytree(base, target)
    for path in artifacts:
        shutil.copy(path, target / path.name)
    return target


def _set_hash(source, target, value) -> None:
    """``source`` saved to ``target`` recording ``value`` as its weights hash (None: none,
    as an export made before the hash was recorded)."""
    import onnx

    proto = onnx.load(str(source))
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            record = json.loads(entry.value)
            record.pop("weights_sha256")
            if value is not None:
                record["weights_sha256"] = value
            entry.value = json.dumps(record)
    onnx.save(proto, str(target))


def test_every_artifact_records_the_weights_it_was_made_from(models):
    a, _ = models
    weights = sha256(a / "weights.pt")
    assert json.loads((a / "model.json").read_text())["weights_sha256"] == weights
    for name in ("model.onnx", "model.int8.onnx"):
        engine = load_engine(a / name)
        assert engine.weights_sha256 == weights, name
        assert engine.describe()["weights_sha256"] == weights
    assert load_engine(a, backend="torch").weights_sha256 == weights


def test_an_export_of_other_weights_is_refused_when_asked_for(models, tmp_path):
    """B's directory holding A's exports: a file or backend asked for is an error."""
    a, b = models
    mixed = model_with(tmp_path, b, a / "model.onnx", a / "model.int8.onnx")
    want, got = sha256(a / "weights.pt"), sha256(b / "weights.pt")
    for call in (
        lambda: load_engine(mixed / "model.onnx"),
        lambda: load_engine(mixed / "model.int8.onnx"),
        lambda: load_engine(mixed, backend="onnxruntime"),
    ):
        with pytest.raises(ProvenanceError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and want in message and got in message


def test_auto_passes_a_stale_export_by_with_a_warning(models, tmp_path, caplog):
    """Before: B's directory mapped with A's model.int8.onnx, silently."""
    a, b = models
    mixed = model_with(tmp_path, b, a / "model.onnx", a / "model.int8.onnx")
    with caplog.at_level(logging.WARNING):
        engine = load_engine(mixed)
    assert engine.name == "torch" and engine.weights_sha256 == sha256(b / "weights.pt")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(sha256(a / "weights.pt") in m and "model.onnx" in m for m in warned)
    # A stale INT8 model is passed by; the FP32 one of these weights is taken.
    good = model_with(tmp_path / "g", a)
    _set_hash(a / "model.int8.onnx", good / "model.int8.onnx", sha256(b / "weights.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = load_engine(good)
    assert engine.name == "onnxruntime" and engine.precision == "fp32"
    assert engine.weights_sha256 == sha256(a / "weights.pt")


def test_without_pytorch_the_stale_export_is_the_error(models, tmp_path, monkeypatch):
    import importlib.util

    a, b = models
    mixed = model_with(tmp_path, b, a / "model.onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *x: None if name == "torch" else real(name, *x)
    )
    with pytest.raises(ProvenanceError, match=sha256(b / "weights.pt")):
        load_engine(mixed)


def test_model_json_of_other_weights_is_refused(models, tmp_path):
    """weights.pt replaced by hand: model.json's calibration and density are not its own."""
    a, b = models
    target = model_with(tmp_path, a)
    (target / "weights.pt").write_bytes((b / "weights.pt").read_bytes())
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(target)
    message = str(caught.value)
    assert sha256(a / "weights.pt") in message and sha256(b / "weights.pt") in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="calibration and density"):
        load_engine(target, backend="torch")


def test_malformed_weights_hash_is_a_metadata_error(models, tmp_path):
    a, _ = models
    target = model_with(tmp_path, a)
    record = json.loads((target / "model.json").read_text())
    record["weights_sha256"] = "abc"
    (target / "model.json").write_text(json.dumps(record))
    with pytest.raises(MetadataError, match="weights_sha256 must be a SHA-256"):
        load_checkpoint(target)


def test_artifacts_from_before_the_hash_load_with_a_warning(models, tmp_path, caplog):
    a, b = models
    mixed = model_with(tmp_path, b)
    _set_hash(a / "model.onnx", mixed / "model.onnx", None)
    with caplog.at_level(logging.WARNING):
        engine = load_engine(mixed / "model.onnx")
    assert engine.weights_sha256 is None
    assert any("records no weights hash" in r.getMessage() for r in caplog.records)
    # A standalone export (no model directory beside it) has nothing to be checked against.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(a / "model.onnx", alone / "model.onnx")
    assert load_engine(alone / "model.onnx").weights_sha256 == sha256(a / "weights.pt")


def test_a_deployment_without_weights_checks_against_model_json(models, tmp_path):
    """model.json + exports, no weights.pt: the hash model.json records is the reference."""
    a, b = models
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(b / "model.json", deploy / "model.json")
    shutil.copy(a / "model.onnx", deploy / "model.onnx")
    assert model_weights(deploy)[0] == sha256(b / "weights.pt")
    with pytest.raises(ProvenanceError, match=r"no weights\.pt"):
        load_engine(deploy / "model.onnx")
    shutil.copy(a / "model.json", deploy / "model.json")
    assert load_engine(deploy).name == "onnxruntime"


def test_tensorrt_engines_are_bound_to_their_sidecar_and_weights(models, tmp_path, fake_gpu):
    from defectscope.engines.tensorrt import TensorRTEngine
    from defectscope.export.tensorrt import build_tensorrt_engine

    a, b = models
    engine = build_tensorrt_engine(a / "model.onnx", tmp_path / "a.fp16.engine", max_batch=4)
    sidecar = json.loads((tmp_path / "a.fp16.engine.json").read_text())
    assert sidecar["weights_sha256"] == sha256(a / "weights.pt")
    assert sidecar["engine_sha256"] == sha256(engine)
    mixed = model_with(tmp_path, b)
    shutil.copy(engine, mixed / "model.fp16.engine")
    shutil.copy(f"{engine}.json", mixed / "model.fp16.engine.json")
    with pytest.raises(ProvenanceError, match=sha256(b / "weights.pt")):
        load_engine(mixed, backend="tensorrt")
    with pytest.raises(ProvenanceError):
        TensorRTEngine(mixed / "model.fp16.engine")
    # Another engine under this sidecar: not the one it describes.
    other = build_tensorrt_engine(a / "model.onnx", tmp_path / "other.engine", max_batch=8)
    assert sha256(other) != sha256(engine)
    shutil.copy(f"{engine}.json", f"{other}.json")
    with pytest.raises(EngineError, match="describes the engine"):
        TensorRTEngine(other)
    # A stale ONNX model is refused before an engine is built from it.
    stale = model_with(tmp_path / "s", b, a / "model.onnx")
    with pytest.raises(ProvenanceError):
        build_tensorrt_engine(stale / "model.onnx", stale / "model.fp16.engine")
    assert not (stale / "model.fp16.engine").exists()


def test_artifact_files_lists_everything_a_run_loads(models, tmp_path):
    a, _ = models
    target = model_with(tmp_path, a)
    dense = target / "dense"
    dense.mkdir()
    for name in ("dense16.onnx", "dense.json", "dense.pt", ".dense16.onnx.abc.tmp"):
        (dense / name).write_bytes(name.encode())
    (target / "notes.txt").write_text("not loaded")
    names = [p.relative_to(target).as_posix() for p in artifact_files(target)]
    assert names == [
        "dense/dense.json",
        "dense/dense.pt",
        "dense/dense16.onnx",
        "model.int8.onnx",
        "model.json",
        "model.onnx",
        "weights.pt",
    ]
    # An ONNX file asked for: it, and what it is checked against and loads beside it.
    names = [p.relative_to(target).as_posix() for p in artifact_files(target / "model.onnx")]
    assert names == [
        "dense/dense.json",
        "dense/dense.pt",
        "dense/dense16.onnx",
        "model.json",
        "model.onnx",
        "weights.pt",
    ]
    hashes = artifact_hashes(target / "model.onnx")
    assert hashes["dense/dense16.onnx"] == hashlib.sha256(b"dense16.onnx").hexdigest()
    assert hashes["weights.pt"] == sha256(a / "weights.pt")
    before = artifact_hashes(target)
    (dense / "dense16.onnx").write_bytes(b"changed")
    assert artifact_hashes(target) != before
    with pytest.raises(EngineError, match="not found"):
        artifact_files(tmp_path / "missing")
