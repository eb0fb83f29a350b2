"""Inference engines behind one interface: ONNX Runtime, TensorRT and PyTorch.

An engine takes normalized float32 NCHW patches and returns calibrated class
probabilities and embeddings. It owns its device, precision and session, so a
caller only passes arrays. This module imports neither PyTorch nor ONNX: the
ONNX Runtime and TensorRT engines run on an instrument PC without them, and
PyTorch is imported only when a model directory is run on the ``torch`` backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.density import FeatureDensity
from defectscope.artifacts.disagreement import DropoutNovelty, EnsembleNovelty
from defectscope.artifacts.metadata import (
    META_FILE,
    ArtifactMetadata,
    MetadataError,
    ModelConfig,
)
from defectscope.artifacts.residual_density import ResidualDensity


class EngineError(ValueError):
    """An artifact cannot be loaded by the requested backend."""


class Engine:
    """Common interface; subclasses implement :meth:`run`."""

    name = "engine"

    def __init__(
        self,
        config: ModelConfig,
        temperature: float = 1.0,
        density: FeatureDensity | None = None,
        weights_sha256: str | None = None,
        residual_density: ResidualDensity | None = None,
        mc_dropout: DropoutNovelty | None = None,
        head_ensemble: EnsembleNovelty | None = None,
    ):
        self.config = config
        self.temperature = float(temperature)
        # The embedding's training density, when the artifact carries one (uncertainty).
        self.density = density
        # SHA-256 of the weights.pt the artifact was made from (None: not recorded).
        self.weights_sha256 = weights_sha256
        # The lattice residual's training density (novelty of a point defect), if carried.
        self.residual_density = residual_density
        # MC dropout of the head, calibrated (a selectable novelty source), if carried.
        self.mc_dropout = mc_dropout
        # A head ensemble on the embedding, calibrated (a selectable source), if carried.
        self.head_ensemble = head_ensemble

    @classmethod
    def fields_of(cls, metadata: ArtifactMetadata) -> dict[str, Any]:
        """The constructor arguments an artifact's checked metadata gives every engine."""
        return {
            "config": metadata.config,
            "temperature": metadata.temperature,
            "density": metadata.density,
            "weights_sha256": metadata.weights_sha256,
            "residual_density": metadata.residual_density,
            "mc_dropout": metadata.mc_dropout,
            "head_ensemble": metadata.head_ensemble,
        }

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.config.patch_size
        return (self.config.normalization.channels, size, size)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, classes)`` and embeddings ``(n, d)`` for ``inputs``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        info = {"backend": self.name, "classes": self.classes, "patch_size": self.config.patch_size}
        if self.weights_sha256 is not None:
            info["weights_sha256"] = self.weights_sha256
        return info


def artifact_kind(path: str | os.PathLike) -> str:
    """'model_dir', 'onnx' or 'tensorrt' for an artifact path."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise EngineError(f"{path}: not a defectscope model directory (no {META_FILE})")
        return "model_dir"
    if not path.is_file():
        raise EngineError(f"{path}: artifact not found")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    raise EngineError(
        f"{path}: unknown artifact type; give a model directory, an .onnx file or an .engine file"
    )


__all__ = ["Engine", "EngineError", "MetadataError", "artifact_kind"]
