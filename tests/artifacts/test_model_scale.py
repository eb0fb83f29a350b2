"""What a model knows about its scale (issue 26, item 1): ``ModelConfig.scale`` in
``model.json`` and in every artifact exported from it.

The export checks use an untrained model: they are about which record travels, not
what the network answers, so nothing is trained here.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from defectscope.artifacts.metadata import (
    ArtifactMetadata,
    MetadataError,
    ModelConfig,
    ModelScale,
    parse_metadata_json,
    read_model_dir,
    read_sidecar,
)
from defectscope.tiling.lattice import LatticePeriods

LATTICE = LatticePeriods(periods=(8.0, 5.657), strengths=(40.0, 12.0))
SCALE = ModelScale(pixel_size=0.0391, unit="nm", lattice=LATTICE)
CONFIG = ModelConfig(classes=("Bulk", "Vacancy"), patch_size=64, embedding_dim=16, scale=SCALE)


def as_json(config: ModelConfig) -> dict:
    """The config as it is written to and read from a file (strict JSON: no NaN)."""
    return json.loads(json.dumps(config.to_dict(), allow_nan=False))


@pytest.mark.parametrize(
    "scale",
    [
        SCALE,
        ModelScale(lattice=LATTICE),  # no pixel size: lattice periods alone
        ModelScale(pixel_size=0.2, unit="Å"),
        # Recorded when nothing could be measured, with why.
        ModelScale(
            lattice=LatticePeriods((), (), measurable=False, reason="no lattice peak above noise")
        ),
        None,
    ],
)
def test_model_config_round_trips_its_scale(scale):
    config = ModelConfig(classes=("Bulk", "Vacancy"), patch_size=64, scale=scale)
    again = ModelConfig.from_dict(as_json(config))
    assert again == config
    assert again.scale == scale
    if scale is not None and scale.lattice is not None:
        assert again.scale.lattice.periods == scale.lattice.periods
        assert again.scale.lattice.measurable == scale.lattice.measurable


def test_records_written_before_the_scale_load_without_one():
    old = {"classes": ["Bulk", "Vacancy"], "patch_size": 64, "embedding_dim": 16}
    assert ModelConfig.from_dict(old).scale is None
    record = {"format_version": 1, "model": old, "calibration": {"temperature": 1.5}}
    assert ArtifactMetadata.from_record(record, "old/model.json").config.scale is None
    # An explicit null is the same as no scale.
    assert ModelConfig.from_dict({**old, "scale": None}).scale is None


def _with_scale(scale) -> dict:
    return {**as_json(CONFIG), "scale": scale}


GOOD = SCALE.to_dict()


@pytest.mark.parametrize(
    ("scale", "key"),
    [
        ({**GOOD, "pixel_size": float("nan")}, "scale.pixel_size"),
        ({**GOOD, "pixel_size": float("inf")}, "scale.pixel_size"),
        ({**GOOD, "pixel_size": -0.02}, "scale.pixel_size"),
        ({**GOOD, "pixel_size": 0}, "scale.pixel_size"),
        ({**GOOD, "pixel_size": "0.02"}, "scale.pixel_size"),
        ({**GOOD, "pixel_size": True}, "scale.pixel_size"),
        ({**GOOD, "unit": None}, "scale.unit"),
        ({**GOOD, "unit": ""}, "scale.unit"),
        ({**GOOD, "unit": 5}, "scale.unit"),
        ({**GOOD, "lattice": "8 px"}, "scale.lattice"),
        ({**GOOD, "lattice": {**LATTICE.to_dict(), "periods": 8.0}}, "periods"),
        ({**GOOD, "lattice": {**LATTICE.to_dict(), "periods": [float("nan")]}}, "periods"),
        ([0.02, "nm"], "scale must be an object"),
    ],
)
def test_a_malformed_scale_is_refused_naming_the_key(scale, key):
    with pytest.raises(MetadataError, match=re.escape(key)):
        ModelConfig.from_dict(_with_scale(scale))
    record = {"model": _with_scale(scale)}
    where = r"m/model\.json: invalid model metadata: .*" + re.escape(key)
    with pytest.raises(MetadataError, match=where):
        ArtifactMetadata.from_record(record, "m/model.json")


def test_a_pixel_size_beyond_the_float_range_in_a_file_is_refused(tmp_path):
    """JSON's 1e400 reads as infinity (not a NaN/Infinity literal the parser refuses)."""
    text = json.dumps({"model": as_json(CONFIG)})
    text = text.replace('"pixel_size": 0.0391', '"pixel_size": 1e400')
    assert "1e400" in text
    record = parse_metadata_json(text, "m/model.json")
    assert math.isinf(record["model"]["scale"]["pixel_size"])
    with pytest.raises(MetadataError, match=r"scale\.pixel_size must be a finite number > 0"):
        ArtifactMetadata.from_record(record, "m/model.json")
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(MetadataError, match=r"scale\.pixel_size"):
        read_model_dir(tmp_path)


def test_a_bad_scale_is_refused_where_it_is_made():
    with pytest.raises(MetadataError, match=r"scale\.pixel_size"):
        ModelScale(pixel_size=float("nan"), unit="nm")
    with pytest.raises(MetadataError, match=r"scale\.unit is missing"):
        ModelScale(pixel_size=0.02)
    with pytest.raises(MetadataError, match=r"scale\.lattice"):
        ModelScale(lattice={"periods": [8.0]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained model saved with a scale, its ONNX export and INT8 models."""
    from defectscope.export.int8 import quantize_onnx_int8
    from defectscope.export.onnx import export_onnx
    from defectscope.nets.checkpoint import save_checkpoint
    from defectscope.nets.vgg import build_model

    root = tmp_path_factory.mktemp("scale-export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(2, patch_size=64, embedding_dim=16).eval()
        save_checkpoint(root, model, CONFIG, {"calibration": {"temperature": 1.5}})
        export_onnx(root, root / "model.onnx")
        patches = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
        quantize_onnx_int8(root / "model.onnx", root / "model.int8.onnx", patches)
        quantize_onnx_int8(
            root / "model.onnx", root / "model.int8.trt.onnx", patches, target="tensorrt"
        )
    finally:
        torch.set_num_threads(threads)
    return root


def test_the_scale_travels_into_model_json_onnx_and_int8(exported):
    from defectscope.engines.loader import load_engine
    from defectscope.export.onnx import read_onnx_metadata

    assert json.loads((exported / "model.json").read_text())["model"]["scale"] == SCALE.to_dict()
    assert read_model_dir(exported).config.scale == SCALE
    for name in ("model.onnx", "model.int8.onnx", "model.int8.trt.onnx"):
        record = read_onnx_metadata(exported / name)
        assert record["model"]["scale"] == SCALE.to_dict(), name
        assert ArtifactMetadata.from_record(record, name).config.scale == SCALE, name
    # What a runtime reads: engine.config.scale.
    assert load_engine(exported / "model.onnx", backend="onnxruntime").config.scale == SCALE


def test_the_scale_travels_into_tensorrt_sidecars(exported, tmp_path, fake_gpu):
    from defectscope.export.tensorrt import build_tensorrt_engine

    for source, precision in (("model.onnx", "fp16"), ("model.int8.trt.onnx", "int8")):
        engine = build_tensorrt_engine(
            exported / source, tmp_path / f"model.{precision}.engine", precision, max_batch=4
        )
        sidecar = json.loads((tmp_path / f"model.{precision}.engine.json").read_text())
        assert sidecar["model"]["scale"] == SCALE.to_dict()
        assert read_sidecar(engine).config.scale == SCALE


def test_dense_graph_metadata_carries_the_scale(exported):
    """Dense graphs (``densify``) take their metadata from the same function as ONNX."""
    from defectscope.export.onnx import artifact_metadata
    from defectscope.nets.checkpoint import load_checkpoint

    _, config, record = load_checkpoint(exported)
    metadata = artifact_metadata(config, record)
    assert ArtifactMetadata.from_record(metadata, "dense").config.scale == SCALE
