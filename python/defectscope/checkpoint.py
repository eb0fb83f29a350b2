"""Self-describing model directories: ``weights.pt`` plus ``model.json``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from defectscope.io import atomic_write_bytes, atomic_write_json
from defectscope.model import ARCHITECTURES, DefectNet
from defectscope.tiling import Normalization

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
_BACKGROUND_NAMES = ("bulk", "background", "lattice", "perfect")


class CheckpointError(ValueError):
    """A model directory is missing files or is not a defectscope model."""


def guess_background(classes: list[str]) -> str | None:
    """The defect-free class: one named like bulk/background, else ``None``."""
    for name in classes:
        if name.lower() in _BACKGROUND_NAMES:
            return name
    return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a runtime needs to rebuild and feed the network."""

    classes: tuple[str, ...]
    patch_size: int = 64
    normalization: Normalization = Normalization()
    embedding_dim: int = 256
    architecture: str = "vgg16"
    background_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["normalization"] = self.normalization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(
            classes=tuple(data["classes"]),
            patch_size=int(data["patch_size"]),
            normalization=Normalization.from_dict(data["normalization"]),
            embedding_dim=int(data.get("embedding_dim", 256)),
            architecture=data.get("architecture", "vgg16"),
            background_class=data.get("background_class"),
        )


def save_checkpoint(
    directory: str | os.PathLike,
    model: DefectNet,
    config: ModelConfig,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write weights and JSON metadata into ``directory`` (each file atomically).

    ``metadata`` holds free-form records such as the training configuration,
    the history and metrics; the model's own ``config`` is stored under ``"model"``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(directory / WEIGHTS_FILE, buffer.getvalue())
    record = {"format_version": FORMAT_VERSION, "model": config.to_dict(), **(metadata or {})}
    atomic_write_json(directory / META_FILE, record)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a model directory."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a defectscope model (no {META_FILE})")
    try:
        record = json.loads(meta_path.read_text())
        ModelConfig.from_dict(record["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: invalid model metadata ({exc})") from exc
    return record


def load_checkpoint(directory: str | os.PathLike) -> tuple[DefectNet, ModelConfig, dict[str, Any]]:
    """Rebuild the network of a model directory, in eval mode on the CPU."""
    directory = Path(directory)
    record = read_metadata(directory)
    config = ModelConfig.from_dict(record["model"])
    if config.architecture not in ARCHITECTURES:
        raise CheckpointError(f"{directory}: unknown architecture {config.architecture!r}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE}")
    n_classes = len(config.classes)
    model = DefectNet(n_classes, config.patch_size, config.embedding_dim, 0.5, config.architecture)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot load weights ({exc})") from exc
    model.eval()
    return model, config, record
