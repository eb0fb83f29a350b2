"""Making a dense artifact from a trained model directory (PyTorch side of :mod:`dense`).

:class:`DenseDefectNet` rewrites a :class:`~defectscope.nets.vgg.DefectNet` as one fully
convolutional graph; :func:`distill_dense` adapts it to frame-consistent
normalization and real neighbours by matching the per-window model's outputs on
windows of unlabeled frames; :func:`make_dense` does both, measures agreement on
frames it did not adapt on and exports ONNX (FP32 and INT8) graphs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.artifacts.metadata import (
    DENSE_DIR,
    METADATA_KEY,
    OUTPUT_NAMES,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
)
from defectscope.artifacts.provenance import ProvenanceError
from defectscope.engines.dense import DENSE_INPUT, DENSE_REPORT, dense_file
from defectscope.export.dense_check import _split_for_check, measure_agreement
from defectscope.export.int8 import quantize_onnx_int8
from defectscope.export.onnx import artifact_metadata
from defectscope.io.files import (
    atomic_write_bytes,
    atomic_write_json,
    file_hash,
    remove_stale_staging,
    replace_dir,
    staging_dir,
)
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.nets.dense import DenseDefectNet, receptive_margin
from defectscope.tiling.tiler import check_frame, normalize_region
from defectscope.training.distill import (
    distill_dense,
    match_density,
    match_dropout,
    match_ensemble,
)

log = logging.getLogger(__name__)
# A dense folder is made here, beside the model's files, and renamed to dense/ when done.
STAGING_PREFIX = ".dense.staging-"


def export_dense_onnx(
    student: DenseDefectNet,
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    margin: int,
    extra: dict[str, Any] | None = None,
    opset: int = 18,
    novelty: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Export a dense model with dynamic height and width (batch of one).

    ``novelty`` (record key to record: ``density``, ``mc_dropout``, ``head_ensemble``)
    replaces the model's records of the sources scored from the embedding with the
    dense graph's recalibrated ones (:func:`match_density`, :func:`match_dropout`,
    :func:`match_ensemble`).
    """
    import onnx

    _, config, record = load_checkpoint(model_dir)
    metadata = artifact_metadata(config, record)
    metadata.update(novelty or {})
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


def _checked_frames(
    frames: Sequence[np.ndarray], config, smallest: int, what: str
) -> list[np.ndarray]:
    """``frames`` as 2-D arrays the dense normalization takes, or an error naming one.

    Checked before any work: a frame found unusable after the adaptation would throw
    the minutes spent on it away.
    """
    if isinstance(frames, np.ndarray) or not isinstance(frames, Sequence):
        raise TypeError(f"{what}s must be a list of 2-D arrays, got {type(frames).__name__}")
    checked = []
    for index, frame in enumerate(frames, 1):
        try:
            frame = check_frame(frame)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} {index}: {exc}") from None
        if min(frame.shape) < smallest:
            extra = " plus 32 px" if smallest > config.patch_size else ""
            raise ValueError(
                f"{what} {index}: shape {frame.shape} is smaller than {smallest} px a side "
                f"(a {config.patch_size}-px window{extra})"
            )
        if normalize_region(frame, config.normalization, box=config.patch_size) is None:
            raise ValueError(
                f"{what} {index}: holds non-finite values (or values too large for the "
                "dense normalization)"
            )
        checked.append(frame)
    return checked


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
    adapted weights ``dense.pt`` and ``dense.json``: the distillation run, the
    agreement with the per-window model on ``check_frames`` (by default the bottom
    quarter of each frame, never seen while adapting), the SHA-256 of the weights the
    graphs were made from (``weights_sha256``) and of every file written (``files``).

    The frames and settings are checked before any work (every frame at least a window
    plus 32 px a side, check frames at least a window, all finite). The folder is made
    in a hidden staging folder beside it and renamed into place at the end, so a run
    that fails or is killed leaves the previous ``dense/`` (or none), never a half-made
    one a map would load.

    Returns the ``dense.json`` record.
    """
    model_dir = Path(model_dir)
    teacher, config, record_in = load_checkpoint(model_dir)
    weights_sha256 = record_in[WEIGHTS_SHA256]
    patch = config.patch_size
    native_strides = list(native_strides)
    if not native_strides:
        raise ValueError("give at least one native stride (32, 16 or 8)")
    for native in native_strides:
        if isinstance(native, bool) or native not in (32, 16, 8):
            raise ValueError(f"native strides must be 32, 16 or 8, got {native!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    frames = _checked_frames(frames, config, patch + 32, "frame")
    if not frames:
        raise ValueError("give at least one frame to adapt the dense graph on")
    if check_frames is None:
        frames, check_frames = _split_for_check(frames, patch)
    else:
        check_frames = _checked_frames(check_frames, config, patch, "check frame")
    window_int8 = model_dir / "model.int8.onnx"
    if not (int8 and window_int8.is_file()):
        window_int8 = None
    else:
        from defectscope.engines.onnx import OnnxEngine

        try:
            OnnxEngine(window_int8, threads=1)
        except ValueError as exc:  # stale or broken: the INT8 agreement is not measured
            log.warning("%s; the INT8 dense graph is not compared with it", exc)
            window_int8 = None
    check_stride = stride if stride % min(native_strides) == 0 else min(native_strides)
    if check_frames and check_stride != stride:
        log.warning(
            "stride %d is not a multiple of native stride %d: agreement is measured at %d",
            stride,
            min(native_strides),
            check_stride,
        )
    remove_stale_staging(model_dir, STAGING_PREFIX)
    out = staging_dir(model_dir, STAGING_PREFIX)
    try:
        record = _make_dense_in(
            out, model_dir, teacher, config, record_in, frames, check_frames, native_strides,
            steps, crop, batch_size, int8, check_stride, seed, progress, window_int8,
        )  # fmt: skip
        record[WEIGHTS_SHA256] = weights_sha256
        record["files"] = {
            p.name: file_hash(p)
            for p in sorted(out.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }
        atomic_write_json(out / DENSE_REPORT, record)
        # The weights must still be the ones the graphs were made from.
        now = file_hash(model_dir / WEIGHTS_FILE)
        if now != weights_sha256:
            raise ProvenanceError(
                f"{model_dir / WEIGHTS_FILE}: changed while densify ran (sha256 "
                f"{weights_sha256}, now {now}); nothing was kept, run densify again"
            )
        replace_dir(out, model_dir / DENSE_DIR)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return record


def _make_dense_in(
    out: Path,
    model_dir: Path,
    teacher,
    config,
    record_in: dict[str, Any],
    frames: list[np.ndarray],
    check_frames: list[np.ndarray],
    native_strides: list[int],
    steps: int,
    crop: int,
    batch_size: int,
    int8: bool,
    check_stride: int,
    seed: int,
    progress: bool,
    window_int8: Path | None,
) -> dict[str, Any]:
    """The work of :func:`make_dense`, written into the staging folder ``out``."""
    patch = config.patch_size
    student, run = distill_dense(
        model_dir, frames, steps, crop, batch_size, seed=seed, progress=progress
    )
    window_embeddings, dense_embeddings = run.pop("embeddings")
    novelty = {}
    if record_in.get("density") is not None:
        novelty["density"] = match_density(
            record_in["density"], window_embeddings, dense_embeddings
        )
    if record_in.get("mc_dropout") is not None:
        novelty["mc_dropout"] = match_dropout(
            record_in["mc_dropout"], student, window_embeddings, dense_embeddings
        )
    if record_in.get("head_ensemble") is not None:
        novelty["head_ensemble"] = match_ensemble(
            record_in["head_ensemble"], window_embeddings, dense_embeddings
        )
    buffer = io.BytesIO()
    torch.save(student.state_dict(), buffer)
    atomic_write_bytes(out / "dense.pt", buffer.getvalue())
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
            graph, model_dir, out / dense_file(native), margin, novelty=novelty
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
        first = min(native_strides)
        record["agreement"]["fp32"] = measure_agreement(
            model_dir, out / dense_file(first), check_frames, check_stride
        )
        if window_int8 is not None:
            record["agreement"]["int8"] = measure_agreement(
                model_dir,
                out / dense_file(first, "int8"),
                check_frames,
                check_stride,
                window_artifact=window_int8,
            )
        record["check_stride"] = check_stride
    record["check_frames"] = [list(f.shape) for f in check_frames]
    return record
