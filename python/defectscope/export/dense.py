"""Making a dense artifact from a trained model directory (PyTorch side of :mod:`dense`).

:class:`DenseDefectNet` rewrites a :class:`~defectscope.nets.vgg.DefectNet` as one fully
convolutional graph; :func:`distill_dense` adapts it to frame-consistent
normalization and real neighbours by matching the per-window model's outputs on
windows of unlabeled frames; :func:`make_dense` does both, measures agreement on
frames it did not adapt on and exports ONNX (FP32 and INT8) graphs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.artifacts.metadata import METADATA_KEY, OUTPUT_NAMES
from defectscope.engines.dense import (
    DENSE_DIR,
    DENSE_INPUT,
    dense_file,
)
from defectscope.export.dense_check import _split_for_check, measure_agreement
from defectscope.export.int8 import quantize_onnx_int8
from defectscope.export.onnx import artifact_metadata
from defectscope.io.files import atomic_write_bytes, atomic_write_json
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.nets.dense import DenseDefectNet, receptive_margin
from defectscope.tiling.tiler import normalize_region
from defectscope.training.distill import distill_dense, match_density


def export_dense_onnx(
    student: DenseDefectNet,
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    margin: int,
    extra: dict[str, Any] | None = None,
    opset: int = 18,
    density: dict[str, Any] | None = None,
) -> Path:
    """Export a dense model with dynamic height and width (batch of one).

    ``density`` replaces the model's feature density in the metadata (the dense
    graph's recalibrated one, :func:`match_density`).
    """
    import onnx

    _, config, record = load_checkpoint(model_dir)
    metadata = artifact_metadata(config, record)
    if density is not None:
        metadata["density"] = density
    metadata["dense"] = {
        "native_stride": student.native_stride,
        "margin": margin,
        "box": config.patch_size,
        "align": student.align,
        **(extra or {}),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, student.in_channels, 256, 256)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        raw = Path(tmp) / "dense.onnx"
        height, width = torch.export.Dim("height"), torch.export.Dim("width")
        torch.onnx.export(
            student.eval(),
            (example,),
            str(raw),
            input_names=[DENSE_INPUT],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({2: height, 3: width},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        atomic_write_bytes(output, proto.SerializeToString())
    return output


def make_dense(
    model_dir: str | os.PathLike,
    frames: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray] | None = None,
    native_strides: Sequence[int] = (16,),
    steps: int = 300,
    crop: int = 256,
    batch_size: int = 4,
    int8: bool = True,
    stride: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Adapt, export and check the dense graphs of ``model_dir`` (``defectscope densify``).

    Writes ``model_dir/dense/``: ``dense<N>.onnx`` (FP32), ``dense<N>.int8.onnx``
    (U8S8 QDQ, calibrated on normalized regions of the frames) and
    ``dense<N>.int8.trt.onnx`` (symmetric QDQ for TensorRT) per native stride, the
    adapted weights ``dense.pt`` and ``dense.json``: the distillation run and the
    agreement with the per-window model on ``check_frames`` (by default the bottom
    quarter of each frame, never seen while adapting).

    Returns the ``dense.json`` record.
    """
    model_dir = Path(model_dir)
    teacher, config, record_in = load_checkpoint(model_dir)
    patch = config.patch_size
    for native in native_strides:
        if native not in (32, 16, 8):
            raise ValueError(f"native strides must be 32, 16 or 8, got {native}")
    if check_frames is None:
        frames, check_frames = _split_for_check(frames, patch)
    student, run = distill_dense(
        model_dir, frames, steps, crop, batch_size, seed=seed, progress=progress
    )
    window_embeddings, dense_embeddings = run.pop("embeddings")
    density = None
    if record_in.get("density") is not None:
        density = match_density(record_in["density"], window_embeddings, dense_embeddings)
    out = model_dir / DENSE_DIR
    out.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, delete=False, suffix=".pt") as handle:
        torch.save(student.state_dict(), handle)
    os.replace(handle.name, out / "dense.pt")
    margin = receptive_margin(teacher, patch)
    # INT8 ranges from normalized regions of the adapting frames, all of one size.
    side = min(256, min(min(f.shape) for f in frames) // 32 * 32)
    rng = np.random.default_rng(seed)
    calibration = []
    for _ in range(16):
        frame = frames[int(rng.integers(len(frames)))]
        y0 = int(rng.integers(frame.shape[0] - side + 1))
        x0 = int(rng.integers(frame.shape[1] - side + 1))
        region = normalize_region(frame, config.normalization, (y0, x0), (side, side), patch)
        if region is not None:
            calibration.append(region)
    record: dict[str, Any] = {"distillation": run, "graphs": {}, "agreement": {}}
    for native in native_strides:
        graph = student.with_stride(native).eval()
        fp32 = export_dense_onnx(
            graph, model_dir, out / dense_file(native), margin, density=density
        )
        record["graphs"][f"{native}/fp32"] = fp32.name
        if int8:
            int8_path = quantize_onnx_int8(
                fp32,
                out / dense_file(native, "int8"),
                np.stack(calibration),
                input_name=DENSE_INPUT,
                batch_size=1,
            )
            record["graphs"][f"{native}/int8"] = int8_path.name
            # TensorRT takes only symmetric INT8: the graph its INT8 engine is built from
            # (export --format tensorrt --dense --precision int8, on a GPU machine).
            trt_path = quantize_onnx_int8(
                fp32,
                out / dense_file(native, "int8", "tensorrt"),
                np.stack(calibration),
                target="tensorrt",
                input_name=DENSE_INPUT,
                batch_size=1,
            )
            record["graphs"][f"{native}/int8-tensorrt"] = trt_path.name
    if check_frames:
        check_stride = stride if stride % min(native_strides) == 0 else min(native_strides)
        first = min(native_strides)
        record["agreement"]["fp32"] = measure_agreement(
            model_dir, out / dense_file(first), check_frames, check_stride
        )
        window_int8 = model_dir / "model.int8.onnx"
        if int8 and window_int8.is_file():
            record["agreement"]["int8"] = measure_agreement(
                model_dir,
                out / dense_file(first, "int8"),
                check_frames,
                check_stride,
                window_artifact=window_int8,
            )
    record["check_frames"] = [list(f.shape) for f in check_frames]
    atomic_write_json(out / "dense.json", record)
    return record
