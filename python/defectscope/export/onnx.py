"""Onnx."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    WEIGHTS_SHA256,
    ArtifactMetadata,
    ModelConfig,
    parse_metadata_json,
)
from defectscope.io.files import atomic_write_bytes
from defectscope.nets.checkpoint import load_checkpoint


class ExportError(RuntimeError):
    """An export failed or its parity check did not hold."""


class _ExportWrapper(nn.Module):
    """Calibrated probabilities and the embedding, the two outputs every engine gives."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.model.forward_with_embedding(x)
        return torch.softmax(logits / self.temperature, dim=1), embedding


def artifact_metadata(config: ModelConfig, record: dict[str, Any]) -> dict[str, Any]:
    """What a runtime needs beside the network: config, temperature and the densities.

    ``record`` is what :func:`~defectscope.nets.checkpoint.load_checkpoint` returns; its
    ``weights_sha256`` (the weights loaded) goes along, so a loader can tell the artifact
    from one made from other weights.
    """
    temperature = record.get("calibration", {}).get("temperature", 1.0)
    metadata = {"model": config.to_dict(), "temperature": float(temperature), "format_version": 1}
    # Uncertainty travels with every artifact.
    for key in ("density", "residual_density", "mc_dropout", "head_ensemble"):
        if record.get(key) is not None:
            metadata[key] = record[key]
    if record.get(WEIGHTS_SHA256) is not None:
        metadata[WEIGHTS_SHA256] = record[WEIGHTS_SHA256]
    return metadata


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    check_inputs: np.ndarray | None = None,
    opset: int = 18,
) -> dict[str, Any]:
    """Export a model directory to ONNX with a dynamic batch axis and check parity.

    Parameters
    ----------
    model_dir : path-like
        Written by ``defectscope train``.
    output : path-like
        The ``.onnx`` file (written atomically).
    check_inputs : ndarray of float32, shape (n, C, P, P), optional
        Normalized real patches for the parity check; random normal ones otherwise.
    opset : int
        ONNX opset.

    Returns
    -------
    dict
        ``{"path", "max_abs_diff_probabilities", "max_abs_diff_embedding", "tolerance"}``.

    Raises
    ------
    ExportError
        When ONNX Runtime and PyTorch differ by more than ``PARITY_TOLERANCE``.
    """
    import onnx

    model, config, record = load_checkpoint(model_dir)
    metadata = artifact_metadata(config, record)
    wrapper = _ExportWrapper(model, metadata["temperature"]).eval()
    channels, size = config.normalization.channels, config.patch_size
    example = torch.zeros(2, channels, size, size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (example,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        proto = onnx.load(str(raw))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        atomic_write_bytes(output, proto.SerializeToString())

    if check_inputs is None:
        check_inputs = np.random.default_rng(0).normal(size=(8, channels, size, size))
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    with torch.inference_mode():
        want = [t.numpy() for t in wrapper(torch.from_numpy(check_inputs))]
    got = _onnx_session(output).run(list(OUTPUT_NAMES), {INPUT_NAME: check_inputs})
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]
    report = {
        "path": str(output),
        "max_abs_diff_probabilities": diffs[0],
        "max_abs_diff_embedding_relative": diffs[1] / max(float(np.abs(want[1]).max()), 1e-6),
        "tolerance": PARITY_TOLERANCE,
        "n_check_patches": len(check_inputs),
    }
    if diffs[0] > PARITY_TOLERANCE or report["max_abs_diff_embedding_relative"] > PARITY_TOLERANCE:
        output.unlink(missing_ok=True)
        raise ExportError(f"ONNX parity check failed: {report}")
    return report


def _onnx_session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The defectscope metadata stored in an exported ONNX file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            record = parse_metadata_json(entry.value, str(path))
            ArtifactMetadata.from_record(record, str(path))
            return record
    raise ExportError(
        f"{path}: ONNX model has no defectscope metadata (not exported by defectscope)"
    )


# float32 ONNX Runtime against PyTorch on the same inputs: larger means a broken export.
PARITY_TOLERANCE = 1e-4
