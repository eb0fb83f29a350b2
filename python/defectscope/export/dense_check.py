"""Dense agreement."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from defectscope.engines.dense import (
    DenseEngine,
    dense_map_arrays,
)
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.tiling.tiler import tile, window_origins
from defectscope.training.distill import _teacher_outputs

# Sources scored from the embedding (engine attribute) and the report key of their
# unknown flags' agreement between the per-window and the dense map.
_FLAG_KEYS = {
    "density": "unknown",
    "mc_dropout": "mc_dropout_unknown",
    "head_ensemble": "ensemble_unknown",
}


def per_window_map(model_dir, frame: np.ndarray, stride: int):
    """Per-window probabilities and embeddings on the grid, from the torch model."""
    model, config, record = load_checkpoint(model_dir)
    model.eval()
    temperature = float(record.get("calibration", {}).get("temperature", 1.0))
    origins = window_origins(frame.shape, config.patch_size, stride)
    p, e = _teacher_outputs(model, frame, origins, config.normalization, temperature)
    return origins, p.numpy(), e.numpy()


def agreement(
    window_probs: np.ndarray, dense_probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Share of windows where the dense and per-window labels agree, overall and per class."""
    want = window_probs.reshape(-1, len(classes)).argmax(1)
    got = dense_probs.reshape(-1, len(classes)).argmax(1)
    per_class = {
        name: {"windows": int((want == k).sum()), "agreement": float(np.mean(got[want == k] == k))}
        for k, name in enumerate(classes)
        if (want == k).any()
    }
    return {"windows": len(want), "agreement": float(np.mean(want == got)), "per_class": per_class}


def _split_for_check(frames: Sequence[np.ndarray], patch: int) -> tuple[list, list]:
    """Adapt on the top three quarters of each frame, check on the rest (no shared pixel)."""
    adapt, check = [], []
    for frame in frames:
        cut = int(frame.shape[0] * 0.75)
        if frame.shape[0] - cut >= patch + 32 and cut >= patch + 32:
            adapt.append(frame[:cut])
            check.append(frame[cut:])
        else:
            adapt.append(frame)
    return adapt, check


def measure_agreement(
    model_dir: str | os.PathLike,
    dense_path: str | os.PathLike,
    frames: Sequence[np.ndarray],
    stride: int,
    window_artifact: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Dense against per-window labels (and unknown flags) on ``frames``, per class.

    The per-window reference is ``window_artifact`` (an ONNX file, so that INT8 is
    compared with INT8) or the model directory's PyTorch model.
    """
    from defectscope.engines.onnx import OnnxEngine

    dense = DenseEngine(dense_path)
    reference = OnnxEngine(window_artifact) if window_artifact is not None else None
    # Each map's unknown flags on its own sources: the dense graph's are recalibrated.
    if reference is None:
        from defectscope.artifacts.metadata import ArtifactMetadata

        source_of = ArtifactMetadata.from_record(load_checkpoint(model_dir)[2], str(model_dir))
    else:
        source_of = reference
    window_sources = {name: getattr(source_of, name) for name in _FLAG_KEYS}
    flags = {
        name: ([], [])
        for name, source in window_sources.items()
        if source is not None and getattr(dense, name) is not None
    }
    want_p, got_p = [], []
    for frame in frames:
        if reference is None:
            origins, p, e = per_window_map(model_dir, frame, stride)
        else:
            origins = window_origins(frame.shape, dense.config.patch_size, stride)
            p, e = [], []
            for start in range(0, len(origins), 64):
                patches = tile(
                    frame,
                    dense.config.patch_size,
                    origins=origins[start : start + 64],
                    normalization=dense.config.normalization,
                )
                pp, ee = reference.run(patches)
                p.append(pp)
                e.append(ee)
            p, e = np.concatenate(p), np.concatenate(e)
        arrays = dense_map_arrays(dense, frame, stride, keep_embeddings=True)
        if arrays is None:
            raise ValueError("a check frame holds non-finite values")
        dense_origins, dp, de = arrays
        if not np.array_equal(dense_origins, origins):
            raise RuntimeError("dense and per-window grids differ")  # a planner bug
        want_p.append(p)
        got_p.append(dp.reshape(len(origins), -1))
        for name, (want, got) in flags.items():
            want.append(window_sources[name].score(e)[2])
            got.append(getattr(dense, name).score(de.reshape(len(origins), -1))[2])
    report = agreement(np.concatenate(want_p), np.concatenate(got_p), dense.classes)
    report["max_abs_diff_probabilities"] = float(
        np.abs(np.concatenate(want_p) - np.concatenate(got_p)).max()
    )
    for name, (want, got) in flags.items():
        if not want:
            continue
        w, g = np.concatenate(want), np.concatenate(got)
        key = _FLAG_KEYS[name]
        report[f"{key}_agreement"] = float(np.mean(w == g))
        report[f"{key}_share"] = {"window": float(w.mean()), "dense": float(g.mean())}
    report["reference"] = str(window_artifact) if window_artifact else "torch fp32"
    report["dense"] = str(dense_path)
    report["stride"] = stride
    return report
