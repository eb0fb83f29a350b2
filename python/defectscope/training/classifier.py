"""Patch classification with a trained model directory (the PyTorch runtime)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

from defectscope.io.frames import read_image
from defectscope.nets.checkpoint import ModelConfig, load_checkpoint
from defectscope.tiling.tiler import patches_to_inputs
from defectscope.training.loop import predict_logits


class PatchClassifier:
    """A trained classifier that owns its network, precision and normalization.

    Examples
    --------
    >>> clf = PatchClassifier.load("runs/cdte/model")          # doctest: +SKIP
    >>> probabilities, embeddings = clf.predict(patches)      # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        temperature: float = 1.0,
        precision: str = "fp32",
        batch_size: int = 64,
    ):
        self.model = model.eval()
        self.config = config
        self.temperature = float(temperature)
        self.precision = precision
        self.batch_size = batch_size

    @classmethod
    def load(cls, directory: str | os.PathLike, precision: str = "fp32") -> PatchClassifier:
        """Load a model directory written by ``defectscope train``."""
        model, config, record = load_checkpoint(directory)
        temperature = record.get("calibration", {}).get("temperature", 1.0)
        return cls(model, config, temperature=temperature, precision=precision)

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and embeddings for gray patches ``(n, P, P)``."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        size = self.config.patch_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"patches must have shape (n, {size}, {size}), got {images.shape}")
        inputs = patches_to_inputs(images, self.config.normalization)
        return predict_logits(self.model, inputs, self.batch_size, self.precision)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated class probabilities ``(n, classes)`` and embeddings ``(n, d)``."""
        logits, embeddings = self.logits(images)
        return softmax(logits / self.temperature, axis=1), embeddings

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> list[dict]:
        """One record per image file: ``{"file", "label", "confidence", "probabilities"}``."""
        size = self.config.patch_size
        images = []
        for path in paths:
            image = read_image(path)
            if image.shape != (size, size):
                raise ValueError(
                    f"{path}: patch shape {image.shape} differs from the model's {size}x{size}"
                )
            images.append(np.asarray(image, dtype=np.float32))
        if not images:
            return []
        probabilities, _ = self.predict(np.stack(images))
        return [
            {
                "file": str(Path(path)),
                "label": self.classes[int(p.argmax())],
                "confidence": float(p.max()),
                "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)},
            }
            for path, p in zip(paths, probabilities, strict=True)
        ]
