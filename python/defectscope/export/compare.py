"""Compare."""

from __future__ import annotations

import os

import numpy as np

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    OUTPUT_NAMES,
)
from defectscope.export.onnx import _onnx_session


def compare_engines(
    reference_path: str | os.PathLike,
    candidate_path: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Agreement (and accuracy, given labels) of two ONNX models on the same patches."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = _run_batched(_onnx_session(reference_path), inputs)
    cand = _run_batched(_onnx_session(candidate_path), inputs)
    result = {
        "n_patches": len(inputs),
        "agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
        "max_abs_diff_probabilities": float(np.abs(ref - cand).max()),
    }
    if labels is not None:
        result["accuracy_reference"] = float(np.mean(ref.argmax(1) == labels))
        result["accuracy_candidate"] = float(np.mean(cand.argmax(1) == labels))
    return result


def _run_batched(session, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    parts = [
        session.run([OUTPUT_NAMES[0]], {INPUT_NAME: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts)
